"""The user-facing command lines: ``vfsd``'s command groups, ``vimg``, and what they share.

Every command here is thin: it parses options (defined once, :mod:`vfs.cli.options`), calls the
library (:mod:`vfs.redirect`, :mod:`vfs.tree`, :mod:`vfs.image`, :mod:`vfs.daemon`) and prints.
Errors reach the user through :mod:`vfs.cli_util`: one line on stderr and the exit code of
the error's class (README, "Exit codes").
"""

"""What the user-facing command lines share: the options (:mod:`vfs.cli.options`, defined once
for ``vfsd``, ``vimg`` and ``vmctl``) and the glue between garbage collection and the formats
(:mod:`vfs.cli.gc`).

Every command is thin: it parses options, calls the library (:mod:`vfs.redirect`,
:mod:`vfs.tree`, :mod:`vfs.image`, :mod:`vfs.daemon`) and prints. Errors reach the user through
:mod:`vfs.cli_util`: one line on stderr and the exit code of the error's class (README,
"Command lines"). The command modules themselves (``vfs/daemon/cli*.py``, ``vfs/image/cli*.py``)
are to move into this package, leaving ``vfs/daemon`` the daemon alone (issue 10; not yet).
"""

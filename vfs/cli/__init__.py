"""The user-facing command lines: ``vfsd`` (:mod:`vfs.cli.vfsd`: store, repo, template, vee,
export and key groups; ``vfsd serve`` starts the daemon of :mod:`vfs.daemon`) and ``vimg``
(:mod:`vfs.cli.vimg`), with what they share: the options defined once for ``vfsd``, ``vimg``
and ``vmctl`` (:mod:`vfs.cli.options`, :mod:`vfs.cli.sealed`), the error edge
(:mod:`vfs.cli.edge`) and the glue between garbage collection and the formats
(:mod:`vfs.cli.gc`).

Every command is thin: it parses options, calls the library (:mod:`vfs.redirect`,
:mod:`vfs.tree`, :mod:`vfs.image`, :mod:`vfs.export`, :mod:`vfs.daemon`) and prints. Errors
reach the user through :mod:`vfs.cli.edge`: one line on stderr and the exit code of the error's
class (README, "Command lines"). Nothing below this package imports it: ``vfs/daemon`` is the
daemon alone (serve, the FUSE adapter, the control socket).
"""

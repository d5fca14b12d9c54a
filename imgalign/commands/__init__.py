"""Subcommands of the ``imgalign`` command line.

Each module here is one subcommand and exposes ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. ``imgalign.cli`` lists them, parses, and turns a
:class:`CommandError` (or the bad-input errors listed in ``imgalign.cli``) into one clear
line on stderr and a non-zero exit, never a traceback.
"""


class CommandError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""

"""The ``patchwire`` command: ``serve`` runs a server; ``config`` checks its settings file; ``status`` shows its
assembly jobs' progress; ``demo`` runs the seed pipeline end to end; ``certs`` writes a self-signed development set
of certificates and tokens.

One module per subcommand (:mod:`~patchwire.cli.serve`, :mod:`~patchwire.cli.config`, :mod:`~patchwire.cli.status`,
:mod:`~patchwire.cli.demo`, :mod:`~patchwire.cli.certs`); :mod:`~patchwire.cli.launch` starts ``patchwire serve`` as a
child process. ``python -m patchwire.cli`` is the same command.
"""

from patchwire.cli._main import build_parser, main

__all__ = ["build_parser", "main"]

"""``python -m patchwire.cli``: the ``patchwire`` command."""

from patchwire.cli import main

raise SystemExit(main())

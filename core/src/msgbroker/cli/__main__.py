"""``python -m msgbroker.cli``: the ``msgbroker`` command."""

from ._main import main

raise SystemExit(main())

"""``python -m msgbroker_servers`` (with scripts/ on the path) is ``scripts/brokers``."""

import sys

from .cli import main

sys.exit(main())

"""``python -m taskrouting``: the ``taskrouting`` command."""
from .cli import main

raise SystemExit(main())

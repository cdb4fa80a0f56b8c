"""``python -m moe_core`` runs the ``moe`` CLI."""

from .cli import main

raise SystemExit(main())

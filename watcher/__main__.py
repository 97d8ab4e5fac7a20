"""``python -m watcher`` runs the command line."""

from watcher.cli.commands import main

raise SystemExit(main())

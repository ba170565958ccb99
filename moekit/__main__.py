"""``python -m moekit`` runs the CLI."""

import sys

from moekit.cli.main import main

sys.exit(main())

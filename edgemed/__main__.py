"""``python -m edgemed`` runs the ``edgemed`` command."""

import sys

from edgemed.cli import main

sys.exit(main())

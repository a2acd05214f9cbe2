"""``python -m art_weightpert.cli``."""

import sys

from art_weightpert.cli.commands import main

sys.exit(main())

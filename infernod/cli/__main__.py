"""`python -m infernod.cli`: the same as the `inferno` command."""

import sys

from infernod.cli.app import main

sys.exit(main())

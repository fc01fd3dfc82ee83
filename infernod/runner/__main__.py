"""``python -m infernod.runner``: see infernod/runner/main.py."""

import sys

from infernod.runner.main import main

sys.exit(main())

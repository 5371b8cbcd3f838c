"""`python -m pdxfer.proxy ...` — same as `pdxfer proxy ...`."""

import sys

from pdxfer.proxy.cli import main

sys.exit(main())

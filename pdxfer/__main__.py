import sys

from pdxfer.cli import main

sys.exit(main())

"""``python -m kvmemu``: the command line (kvmemu.cli)."""

import sys

from kvmemu.cli import main

if __name__ == "__main__":
    sys.exit(main())

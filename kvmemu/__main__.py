import sys

from kvmemu.cli import main

sys.exit(main())

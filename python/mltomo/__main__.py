import sys

from mltomo.cli import main

sys.exit(main())

import sys

from dsrna.cli import main

sys.exit(main())

"""``python -m benchmarks [options]`` is ``dsrna bench [options]``."""

import sys

from dsrna.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))

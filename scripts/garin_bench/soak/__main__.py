import sys

from garin_bench.soak.cli import main

sys.exit(main())

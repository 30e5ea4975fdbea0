import sys

from simulations.bench.cli import main

sys.exit(main())

"""`python -m benchmarks`: see benchmarks/suite.py and docs/benchmarks.md."""

import sys

from benchmarks.suite import main

sys.exit(main())

"""`python -m benchmarks`: see benchmarks/suite.py and docs/benchmarks.md."""

import sys

if sys.argv[1:2] == ["controlnet"]:  # the ControlNet scenario (benchmarks/controlnet.py)
    from benchmarks.controlnet import main

    sys.exit(main(sys.argv[2:]))
from benchmarks.suite import main

sys.exit(main())

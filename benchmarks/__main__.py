"""`python -m benchmarks`: see benchmarks/suite.py and docs/benchmarks.md; `python -m benchmarks
--fewstep ...`: the few-step scenarios of benchmarks/fewstep.py; `python -m benchmarks controlnet ...` and
`python -m benchmarks sdxl ...`: benchmarks/controlnet.py and benchmarks/sdxl.py."""

import sys

if sys.argv[1:2] == ["controlnet"]:  # the ControlNet scenario (benchmarks/controlnet.py)
    from benchmarks.controlnet import main

    sys.exit(main(sys.argv[2:]))
if sys.argv[1:2] == ["sdxl"]:  # full-size SDXL and its peers (benchmarks/sdxl.py)
    from benchmarks.sdxl import main as sdxl_main

    sys.exit(sdxl_main(sys.argv[2:]))
if "--fewstep" in sys.argv[1:]:
    from benchmarks.fewstep import main as fewstep_main

    sys.exit(fewstep_main([a for a in sys.argv[1:] if a != "--fewstep"]))

from benchmarks.suite import main

sys.exit(main())

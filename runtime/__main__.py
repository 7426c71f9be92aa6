"""`python -m runtime txt2img|img2img|inpaint ENGINE_DIR PROMPT ...` (see runtime/cli.py)."""

import sys

from runtime.cli import main

sys.exit(main())

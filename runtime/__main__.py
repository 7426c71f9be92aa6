"""`python -m runtime txt2img|img2img|inpaint ENGINE_DIR PROMPT ...` (see runtime/cli.py), and
`python -m runtime serve ENGINE_DIR ...` (the HTTP server, runtime/serving/server.py)."""

import sys

if sys.argv[1:2] == ["serve"]:
    from runtime.serving.server import main as serve

    sys.exit(serve(sys.argv[2:]))

from runtime.cli import main  # noqa: E402

sys.exit(main())

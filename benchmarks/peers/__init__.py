"""Peers that cannot live in the project environment, each run with the Python of its own venv.

- `optimum`: optimum-intel's `OVStableDiffusionPipeline` (OpenVINO IR exported by optimum, static-
  reshaped); venv `.venv-optimum`, made by `benchmarks/peers/setup-optimum.sh`.
- `genai`: openvino.genai's `Text2ImagePipeline` on the IR optimum exports (benchmarks/fewstep.py's
  scenarios); the same venv, where setup-optimum.sh adds `openvino-genai` and `openvino-tokenizers`.
- `sdcpp`: stable-diffusion.cpp through `stable-diffusion-cpp-python` (ggml, CPU); venv `.venv-sdcpp`,
  made by `benchmarks/peers/setup-sdcpp.sh`.

optimum-intel pulls torch 2.14.1 (a CUDA build) and transformers 5.5.4, which must not replace the
project's pinned torch 2.13.0 CPU build; stable-diffusion-cpp-python compiles ggml at install time.
So each has its own venv, and the suite runs its worker module (`benchmarks/peers/<runner>_worker.py`,
speaking the TASK.json / RESULT.json protocol of `benchmarks/protocol.py` as `benchmarks/worker.py` does)
with that venv's interpreter, from the repository root. The workers import nothing of `runtime/` or
`export/` (benchmarks.protocol is standard library and NumPy only): the suite hands them everything they
need (prompt, feeds, latents, paths) in the task.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PROBE_TIMEOUT_S = 120.0
# Prints the modules of argv that do not resolve in the interpreter that runs it.
_PROBE = ("import importlib.util, sys\n"
          "missing = []\n"
          "for name in sys.argv[1:]:\n"
          "    try:\n"
          "        found = importlib.util.find_spec(name) is not None\n"
          "    except ImportError:\n"
          "        found = False\n"
          "    if not found:\n"
          "        missing.append(name)\n"
          "print(' '.join(missing))\n")


@dataclass(frozen=True)
class Runner:
    name: str
    venv: str  # relative to the repository root
    module: str  # worker module, run as `python -m MODULE TASK.json RESULT.json`
    setup: str  # the script that makes the venv
    imports: tuple[str, ...]  # modules the worker needs in that venv

    def default_python(self, root: Path = ROOT) -> Path:
        return root / self.venv / "bin" / "python"


RUNNERS = {
    "optimum": Runner("optimum", ".venv-optimum", "benchmarks.peers.optimum_worker",
                      "benchmarks/peers/setup-optimum.sh", ("optimum.intel", "diffusers", "openvino", "torch")),
    "genai": Runner("genai", ".venv-optimum", "benchmarks.peers.genai_worker",
                    "benchmarks/peers/setup-optimum.sh", ("openvino_genai", "openvino_tokenizers", "openvino", "numpy")),
    "sdcpp": Runner("sdcpp", ".venv-sdcpp", "benchmarks.peers.sdcpp_worker",
                    "benchmarks/peers/setup-sdcpp.sh", ("stable_diffusion_cpp", "numpy")),
}


def runner(name: str) -> Runner:
    try:
        return RUNNERS[name]
    except KeyError:
        raise ValueError(f"unknown peer runner {name!r}; known: {', '.join(RUNNERS)}") from None


def interpreter(name: str, override: str | Path | None = None, root: Path = ROOT) -> Path:
    """The Python that runs `name`'s worker: `override` (--optimum-python / --sdcpp-python) when
    given, else the runner's venv under `root`."""
    return Path(override) if override else runner(name).default_python(root)


def availability(name: str, override: str | Path | None = None, root: Path = ROOT) -> tuple[bool, str]:
    """(True, "") when `name`'s interpreter exists and finds every module its worker imports;
    else (False, the reason, naming the setup script)."""
    r = runner(name)
    python = interpreter(name, override, root)
    flag = f"--{name}-python"
    if not python.is_file():
        return False, (f"no {name} venv: {python} does not exist (make it with `bash {r.setup}`, "
                       f"or pass {flag} PATH)")
    try:
        proc = subprocess.run([str(python), "-c", _PROBE, *r.imports], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{python} does not run ({type(e).__name__}: {e}); remake it with `bash {r.setup}`"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return False, f"{python} failed to probe its modules (exit {proc.returncode}: {tail[0]})"
    missing = proc.stdout.split()
    if missing:
        return False, f"{python} lacks {', '.join(missing)} (install them with `bash {r.setup}`)"
    return True, ""

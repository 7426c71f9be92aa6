"""Every image the runtime made before the request-path refactor (issue 24) stays bit-identical.

tests/golden/render.py renders a fixed set through the public API (every sampler, txt2img /
img2img / both kinds of inpainting, a batch of 3, step caching, a LoRA folder, A1111 weighting,
tiled decode; ONNX Runtime and OpenVINO f32). `reference.npz` beside it was rendered by the code
of commit BASELINE (before the refactor) on the machine `reference.json` describes. Engines' float
results depend on the CPU's kernels (AVX2 and AVX-512 builds of a GEMM round differently), so on
another machine, or with other library versions, the reference is rendered again here by BASELINE's
`runtime/` (taken from git history) in a subprocess; either way the comparison is bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
from importlib import metadata
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).parent.parent
from golden import render  # noqa: E402  (tests/golden/render.py)


def machine_signature() -> str:
    """What decides the engines' float rounding here: the CPU model and flags, the library versions."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")), [])
    versions = [f"{d}={metadata.version(d)}" for d in ("numpy", "onnxruntime", "openvino")]
    text = "\n".join([platform.machine(), model, " ".join(sorted(flags)), *versions, str(os.cpu_count())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _baseline_runtime(commit: str, dest: Path) -> Path:
    """BASELINE's runtime/ package, extracted from git history into dest."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "runtime"],
                                 check=True, capture_output=True, timeout=120).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"the golden reference was made on another machine and must be rendered again by commit "
                    f"{commit}'s runtime/, but git cannot provide it (a shallow clone?): {e}")
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    return render.make_folders(tmp_path_factory.mktemp("golden-engines"))


@pytest.fixture(scope="module")
def reference(engines, tmp_path_factory) -> dict[str, np.ndarray]:
    meta = json.loads((GOLDEN / "reference.json").read_text())
    if meta["signature"] == machine_signature():
        with np.load(GOLDEN / "reference.npz") as ref:
            return {k: ref[k] for k in ref.files}
    old = _baseline_runtime(meta["baseline"], tmp_path_factory.mktemp("baseline"))
    out = old / "reference.npz"
    env = {**os.environ, "PYTHONPATH": str(old)}
    subprocess.run([sys.executable, str(GOLDEN / "render.py"), str(engines), str(out)], check=True, cwd=old, env=env,
                   timeout=1200)
    with np.load(out) as ref:
        return {k: ref[k] for k in ref.files}


def test_the_set_covers_what_the_refactor_touches(reference):
    keys = set(reference)
    for backend in render.BACKENDS:
        for s in render.SAMPLERS:
            assert f"{backend}/txt2img-{s}" in keys
        for case in ("img2img-euler", "inpaint-4ch", "inpaint-9ch", "txt2img-batch3", "generate-3", "txt2img-cached",
                     "inpaint-4ch-cached", "lora-txt2img", "txt2img-a1111", "txt2img-tiled", "sd2-euler"):
            assert f"{backend}/{case}" in keys
    assert reference["onnxruntime/txt2img-batch3"].shape[0] == 3


def test_images_are_bit_identical_to_the_baseline(engines, reference):
    """The current runtime renders every image of the set exactly as the baseline did."""
    now = render.render(engines)
    assert sorted(now) == sorted(reference)
    differ = {k: float(np.abs(now[k] - reference[k]).max()) for k in reference
              if now[k].shape != reference[k].shape or not np.array_equal(now[k], reference[k])}
    assert not differ, f"images differ from the baseline (max abs difference): {differ}"

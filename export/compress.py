"""Opt-in int8 weight-only compression of the U-Net and the text encoders for the OpenVINO CPU engine
(`build-engine --quantize int8-weights`), for machines short of memory.

What: NNCF `compress_weights` (mode INT8_ASYM: per output channel, asymmetric, as NNCF's default)
over the fp32 graphs: weights are stored as int8 with scales and decompressed inside the kernels;
activations stay in the engine's precision. About 4x smaller weights (SD 1.5: U-Net 3.4 GB ->
0.86 GB in the IR), no calibration data needed. The networks: the U-Net and each text encoder the
folder has (SD 1.x / 2.x: text_encoder; SDXL: text_encoder and text_encoder_2, the 2.8 GB OpenCLIP
bigG; the SDXL refiner: text_encoder_2). Checked like the int8 U-Net (export/quantize.py): each
network against its fp32 graph on the feeds it was given in a held-out denoising run, and the
held-out image's PSNR with all of them compressed; the build fails above `MAX_RMS_ERROR`.

Output: `openvino/<network>-int8w.{xml,bin}` and the manifest entry
`backends["openvino"]["weights_int8"] = {"scheme", "networks": {network: {file, weights, sha256,
weights_sha256, rms_rel}}, "parity", ...}`. The OpenVINO engine runs them by default when present
(`quantized=False` opts out); other backends ignore them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.hashing import file_sha256
from export.quantize import HELD_OUT_PROMPT, SUBDIR, QuantizeError, Progress, _Runs, _txt2img, record_feeds
from runtime import cpu
from runtime.folder.manifest import Manifest
from runtime.compare import psnr

SCHEME = "int8-weights"
# the networks with most weights, where the folder has them (SD 1.5: U-Net 3.4 GB, text encoder 0.49 GB in
# fp32; SDXL: U-Net 10.3 GB, text_encoder_2 2.8 GB, text_encoder 0.49 GB); the VAE's are small and sensitive
NETWORKS = ("unet", "text_encoder", "text_encoder_2")
MAX_RMS_ERROR = 0.05  # per network, rms(int8w - fp32) / rms(fp32) on the held-out run's feeds
STEPS = 10


def compress_weights(engine_dir: str | os.PathLike, manifest: Manifest, *, seed: int = 0, size: int | None = None,
                     max_rms_error: float = MAX_RMS_ERROR, progress: Progress = print) -> dict[str, Any]:
    """Compress the weights of the U-Net and the folder's text encoders (`NETWORKS`) to int8, check
    them, write the IRs into the folder and return the manifest entry (`{"weights_int8": ...}`).
    Raises QuantizeError; nothing is left behind then."""
    import nncf
    import openvino as ov

    engine_dir = Path(engine_dir)
    size = size or manifest.shapes["opt_image"]
    start = time.perf_counter()
    run = _Runs(engine_dir, size, STEPS, seed, progress)
    networks = tuple(n for n in NETWORKS if n in manifest.networks)
    with run.pipeline() as pipe:  # the held-out run: each network's feeds, and the fp32 image
        feeds, (reference,) = record_feeds(pipe, networks, (HELD_OUT_PROMPT,), STEPS, size, seed, progress,
                                           what="held-out", output_type="np")
    out_dir = engine_dir / SUBDIR
    out_dir.mkdir(exist_ok=True)
    written: list[Path] = []
    try:
        entries = {}
        for network in networks:
            graph = engine_dir / manifest.networks[network]["file"]
            model = nncf.compress_weights(_folded(ov.Core().read_model(str(graph))),
                                          mode=nncf.CompressWeightsMode.INT8_ASYM)
            xml = out_dir / f".{network}-int8w.{os.getpid()}.tmp.xml"
            ov.save_model(model, str(xml), compress_to_fp16=False)
            del model  # its int8 weights are on disk; the check below holds the fp32 graph compiled
            written += [xml, xml.with_suffix(".bin")]
            rms = _rms_error(xml, graph, feeds[network])
            progress(f"  {network} with int8 weights vs its fp32 graph: rms relative error {rms:.3g} "
                     f"(threshold {max_rms_error:g})")
            if not rms <= max_rms_error:
                raise QuantizeError(f"{network} with int8 weights differs from its fp32 graph by {rms:.3g} (rms "
                                    f"relative error), above the threshold {max_rms_error:g}")
            entries[network] = {"tmp": xml, "rms_rel": rms}
        image = _image_with(run, {n: e["tmp"] for n, e in entries.items()}, seed)
        final = _move_into_place(engine_dir, entries)
        written = []
    finally:
        for p in written:
            p.unlink(missing_ok=True)
    return {"weights_int8": {
        "scheme": SCHEME, "networks": final, "method": "nncf.compress_weights, INT8_ASYM (per output channel)",
        "parity": {"image_psnr_db": psnr(image, reference), "held_out_prompt": HELD_OUT_PROMPT, "steps": STEPS,
                   "threshold_rms_rel": max_rms_error, "reference": "fp32 graphs (OpenVINO f32)"},
        "built_on": cpu.describe(), "seconds": round(time.perf_counter() - start, 1), "nncf": nncf.__version__,
        "openvino": ov.get_version()}}


def _folded(model: Any) -> Any:
    """`model` with its constant subgraphs folded (OpenVINO's ConstantFolding, as the CPU plugin runs
    when it compiles). A graph exported lean (export/onnx_export.py: SDXL's U-Net) feeds each Linear
    its weight through a Transpose node, and NNCF compresses only weights that reach a MatMul or
    Convolution as constants: unfolded, 2.2 G of the SDXL U-Net's 2.6 G parameters stayed fp32
    (an "int8-weight" IR of 9.2 GB instead of about 2.6)."""
    from openvino.passes import ConstantFolding, Manager

    manager = Manager()
    manager.register_pass(ConstantFolding())
    manager.run_passes(model)
    return model


def _rms_error(xml: Path, graph: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """rms(int8w - fp32) / rms(fp32) over the feeds and every output, both at f32 inference precision."""
    import openvino as ov

    core = ov.Core()
    test = core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ref = core.compile_model(core.read_model(str(graph)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    se = sr = 0.0
    for f in feeds:
        for a, b in zip(test(f).values(), ref(f).values()):  # every output (SDXL's text_encoder_2: two)
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            se, sr = se + float(((a - b) ** 2).sum()), sr + float((b ** 2).sum())
    return (se / max(sr, 1e-30)) ** 0.5


def _image_with(run: _Runs, irs: dict[str, Path], seed: int) -> np.ndarray:
    """The held-out image with the compressed networks swapped in (at the runtime's default precision)."""
    from runtime.engines.openvino import OpenVinoEngine

    with run.pipeline() as pipe:
        for network, xml in irs.items():
            old = pipe.engine(network)
            pipe.engines[network] = OpenVinoEngine(xml, network, old.inputs, old.outputs, quantized=True)
            old.close()
        return _txt2img(pipe, HELD_OUT_PROMPT, run.size, run.steps, seed, "np")


def _move_into_place(engine_dir: Path, entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for network, entry in entries.items():
        xml = engine_dir / SUBDIR / f"{network}-int8w.xml"
        os.replace(entry["tmp"].with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(entry["tmp"], xml)
        rel = lambda p: p.relative_to(engine_dir).as_posix()  # noqa: E731
        out[network] = {"file": rel(xml), "weights": rel(xml.with_suffix(".bin")), "sha256": file_sha256(xml),
                        "weights_sha256": file_sha256(xml.with_suffix(".bin")), "rms_rel": entry["rms_rel"]}
    return out

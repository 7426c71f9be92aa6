"""Post-training int8 quantization of the U-Net for the OpenVINO CPU engine (`build-engine --quantize int8`).

Why: on a CPU without AMX the OpenVINO bf16 U-Net already runs near the CPU's bf16 peak (on the
2-core AMD EPYC Zen 5 we benchmark on: 0.8 TFLOP/s effective against 0.88 TFLOP/s for one large bf16
GEMM), so only cheaper arithmetic is faster. AVX-512 VNNI int8 dot products do twice the work of
AVX-512 bf16 ones per instruction.

What: NNCF post-training quantization (`nncf.quantize`, `ModelType.TRANSFORMER`: int8 weights per
output channel, int8 activations per tensor, SmoothQuant on the MatMuls) of the fp32 U-Net graph,
calibrated on the U-Net inputs of real denoising runs: the folder's own text encoder, scheduler and
fp32 U-Net generate `prompts` x `steps` guidance-batch calls at the folder's optimal image size.
One further run, with a prompt and seed not used for calibration, measures the int8 U-Net against
the fp32 graph twice: call by call on that run's U-Net inputs (the build fails when the rms relative
error exceeds `max_rms_error`), and end to end, as the PSNR of the int8 run's image against the fp32
run's.

Output: `openvino/unet-int8.xml` + `.bin` (OpenVINO IR, dynamic shapes like the ONNX graph) and the
manifest entry `backends["openvino"]["unet_int8"]`. The OpenVINO engine uses it for the U-Net by
default when present (`quantized=False` opts out); other backends ignore it.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from export.hashing import file_sha256
from runtime import cpu
from runtime.engines.base import Engine
from runtime.folder.manifest import Manifest
from runtime.compare import psnr, rel_err

SUBDIR = "openvino"
STEM = "unet-int8"
SCHEMES = ("int8", "int8-weights")  # int8-weights: export/compress.py
# Calibration prompts: our own, varied subjects and styles, plus the demo model's domain (shapes).
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red circle on a blue background",
    "an oil painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old man with a grey beard, studio lighting",
    "a green triangle on a yellow background",
    "a bowl of fruit on a wooden table, still life",
    "a futuristic city skyline at night, neon lights, digital art",
    "a watercolor sketch of a cat sleeping on a windowsill",
)
HELD_OUT_PROMPT = "a snowy mountain village with a small church, morning light"
DEFAULT_STEPS = 10
GUIDANCE_SCALE = 7.5  # diffusers' default
# NNCF's overflow fix on all layers: int8 weights use 7 bits of range, so u8 activations x s8 weights
# cannot saturate the s16 pair sums of `vpmaddubsw`, the int8 dot product of CPUs without VNNI
# (AVX2, AVX-512 without VNNI). NNCF's default fixes the first layer only, which is right on
# VNNI/AMX CPUs but not on the others, and a folder may be copied to any CPU. Measured on the demo
# model's held-out run (rms relative error vs the fp32 graph): without the fix 0.028 with VNNI and
# 0.089 under ONEDNN_MAX_CPU_ISA=AVX2 (the AVX2-only EPYC: 0.165 on SD 1.5); with it 0.033
# on both. Again on 2026-12-01 with four calibration prompts, adding an emulated AVX2-only CPU
# (qemu-x86_64 -cpu max, tests/test_quantize.py): without the fix 0.034 native, 0.118 capped, 0.118
# emulated; with it 0.038 on all three. The cost on VNNI CPUs is that small accuracy step; the
# kernels are the same int8 ones.
OVERFLOW_FIX = "enable"
# Build fails above this: rms(int8 - fp32) / rms(fp32) over the held-out run's U-Net calls. Measured
# on one random call of random-weight SD 1.5 at 256 px: bf16 alone 2.1e-2, int8 5.4e-2.
MAX_RMS_ERROR = 0.1

Progress = Callable[[str], Any]


class QuantizeError(RuntimeError):
    """The U-Net cannot be quantized (missing package, wrong graph precision, parity too far off)."""


def is_available() -> tuple[bool, str]:
    """(True, "") when nncf and openvino import; else (False, why with the install hint)."""
    for module, extra in (("openvino", "openvino"), ("nncf", "quantize")):
        try:
            __import__(module)
        except ImportError as e:
            return False, f"{module} is not installed ({e}); pip install 'sd-runtime[{extra}]'"
    return True, ""


class RecordingEngine(Engine):
    """Runs another engine and keeps a copy of every feed it was given."""

    def __init__(self, inner: Engine):
        super().__init__(inner.name, inner.inputs, inner.outputs)
        self.backend = inner.backend
        self.inner = inner
        self.feeds: list[dict[str, np.ndarray]] = []

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.inner.run(feeds)


def _txt2img(pipe: Any, prompt: str, size: int, steps: int, seed: int, output_type: str) -> np.ndarray:
    return pipe.txt2img(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE,
                        seed=seed, output_type=output_type, progress=False).images


def record_feeds(pipe: Any, networks: tuple[str, ...], prompts: tuple[str, ...], steps: int, size: int, seed: int,
                 progress: Progress, what: str = "calibration",
                 output_type: str = "latent") -> tuple[dict[str, list[dict[str, np.ndarray]]], list]:
    """The feeds each of `networks` is given in `pipe`'s txt2img runs (one image per prompt, seeds
    seed, seed + 1, ...), {network: [feeds, ...]}, and the runs' outputs."""
    inner = {network: pipe.engine(network) for network in networks}
    recorders = {network: RecordingEngine(engine) for network, engine in inner.items()}
    pipe.engines.update(recorders)
    outputs = []
    try:
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            outputs.append(_txt2img(pipe, prompt, size, steps, seed + i, output_type))
            progress(f"  {what} run {i + 1}/{len(prompts)} ({prompt!r}): {time.perf_counter() - start:.1f} s")
    finally:
        pipe.engines.update(inner)
    return {network: r.feeds for network, r in recorders.items()}, outputs


def record_unet_feeds(pipe: Any, prompts: tuple[str, ...], steps: int, size: int, seed: int, progress: Progress,
                      what: str = "calibration", output_type: str = "latent") -> tuple[list[dict[str, np.ndarray]], list]:
    """`record_feeds` of the U-Net alone: its feeds and the runs' outputs."""
    feeds, outputs = record_feeds(pipe, ("unet",), prompts, steps, size, seed, progress, what, output_type)
    return feeds["unet"], outputs


def quantize_unet(engine_dir: str | os.PathLike, manifest: Manifest, *, scheme: str = "int8",
                  prompts: tuple[str, ...] = CALIBRATION_PROMPTS, steps: int = DEFAULT_STEPS, size: int | None = None,
                  seed: int = 0, max_rms_error: float = MAX_RMS_ERROR, progress: Progress = print) -> dict[str, Any]:
    """Quantize the fp32 U-Net of the engine folder (its manifest must be on disk); write
    `openvino/unet-int8.{xml,bin}` there and return the manifest entry for
    `backends["openvino"]["unet_int8"]`. Raises `QuantizeError`; nothing is left behind then."""
    _check_request(manifest, scheme, prompts, steps)
    import nncf
    import openvino as ov

    engine_dir = Path(engine_dir)
    size = size or manifest.shapes["opt_image"]
    start = time.perf_counter()
    progress(f"calibrating: {len(prompts)} prompts x {steps} steps at {size}x{size} (fp32 graphs, OpenVINO f32)")
    run = _Runs(engine_dir, size, steps, seed, progress)
    feeds, held_out, reference = run.record(prompts)
    t_quant = time.perf_counter()
    progress(f"quantizing the U-Net with nncf {nncf.__version__} on {len(feeds)} calibration calls")
    fp32_graph = engine_dir / manifest.networks["unet"]["file"]
    quantized = nncf.quantize(ov.Core().read_model(str(fp32_graph)), nncf.Dataset(feeds), subset_size=len(feeds),
                              model_type=nncf.ModelType.TRANSFORMER, advanced_parameters=_advanced_parameters())
    quant_s = time.perf_counter() - t_quant
    xml, parity = _save_checked(engine_dir, quantized, fp32_graph, held_out, reference, run, max_rms_error, progress)
    rel = lambda p: p.relative_to(engine_dir).as_posix()  # noqa: E731
    return {
        "unet_int8": {
            "file": rel(xml), "weights": rel(xml.with_suffix(".bin")),
            "sha256": file_sha256(xml), "weights_sha256": file_sha256(xml.with_suffix(".bin")),
            "scheme": scheme,
            "method": "nncf.quantize, ModelType.TRANSFORMER (int8 weights per channel, int8 activations per tensor)",
            "overflow_fix": OVERFLOW_FIX, "built_on": cpu.describe(),
            "calibration": {"prompts": list(prompts), "steps": steps, "size": size, "seed": seed,
                            "guidance_scale": GUIDANCE_SCALE, "calls": len(feeds)},
            "parity": {**parity, "threshold_rms_rel": max_rms_error, "reference": "fp32 graph (OpenVINO f32)",
                       "held_out_prompt": HELD_OUT_PROMPT},
            "seconds": round(time.perf_counter() - start, 1), "quantize_seconds": round(quant_s, 1),
            "nncf": nncf.__version__, "openvino": ov.get_version(),
        }
    }


def _advanced_parameters() -> Any:
    """NNCF's overflow fix on every layer (see OVERFLOW_FIX)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    return AdvancedQuantizationParameters(overflow_fix=OverflowFix(OVERFLOW_FIX))


def _check_request(manifest: Manifest, scheme: str, prompts: tuple[str, ...], steps: int) -> None:
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantization scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    ok, why = is_available()
    if not ok:
        raise QuantizeError(f"--quantize {scheme} needs nncf and openvino: {why}")
    if manifest.networks["unet"].get("precision") != "fp32":
        raise QuantizeError("int8 quantization starts from the fp32 U-Net graph; build with --precision fp32")
    if not prompts or steps < 1:
        raise QuantizeError(f"calibration needs at least one prompt and one step; got {len(prompts)} prompts, "
                            f"{steps} steps")


class _Runs:
    """The folder's own txt2img runs on its fp32 graphs (OpenVINO f32), for calibration and checks."""

    def __init__(self, engine_dir: Path, size: int, steps: int, seed: int, progress: Progress):
        self.engine_dir, self.size, self.steps, self.seed, self.progress = engine_dir, size, steps, seed, progress
        self.held_out_seed = seed

    def pipeline(self) -> Any:
        import runtime

        return runtime.load(self.engine_dir, backend="openvino", inference_precision="f32", cache_dir=None,
                            quantized=False)

    def record(self, prompts: tuple[str, ...]) -> tuple[list, list, np.ndarray]:
        """(calibration feeds, held-out feeds, held-out fp32 image)."""
        with self.pipeline() as pipe:
            feeds, _ = record_unet_feeds(pipe, prompts, self.steps, self.size, self.seed, self.progress)
            self.held_out_seed = self.seed + len(prompts)
            held_out, (reference,) = record_unet_feeds(pipe, (HELD_OUT_PROMPT,), self.steps, self.size,
                                                       self.held_out_seed, self.progress, what="held-out",
                                                       output_type="np")
        gc.collect()  # the full-size fp32 networks: several GB, not needed while NNCF holds its own copy
        return feeds, held_out, reference

    def held_out_image(self, unet_xml: Path) -> np.ndarray:
        """The held-out run again with the int8 U-Net at the runtime's default precision (the other
        networks stay f32, so the difference is the U-Net's)."""
        from runtime.engines.openvino import OpenVinoEngine

        with self.pipeline() as pipe:
            fp32_unet = pipe.engines["unet"]
            pipe.engines["unet"] = OpenVinoEngine(unet_xml, "unet", fp32_unet.inputs, fp32_unet.outputs, quantized=True)
            fp32_unet.close()
            return _txt2img(pipe, HELD_OUT_PROMPT, self.size, self.steps, self.held_out_seed, "np")


def _save_checked(engine_dir: Path, quantized: Any, fp32_graph: Path, held_out: list, reference: np.ndarray,
                  run: _Runs, max_rms_error: float, progress: Progress) -> tuple[Path, dict[str, Any]]:
    """Save the quantized model under a temporary name, check it on the held-out run, and rename it
    into place only if it passes; nothing is left behind otherwise."""
    import openvino as ov

    out_dir = engine_dir / SUBDIR
    created = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)
    xml, tmp = out_dir / f"{STEM}.xml", out_dir / f".{STEM}.{os.getpid()}.tmp.xml"
    try:
        ov.save_model(quantized, str(tmp), compress_to_fp16=False)
        del quantized
        parity = _parity(ov.Core(), tmp, fp32_graph, held_out)
        parity["image_psnr_db"] = psnr(run.held_out_image(tmp), reference)
        progress(f"  int8 U-Net vs fp32 graph on {parity['calls']} held-out calls: rms relative error "
                 f"{parity['rms_rel']:.3g} (threshold {max_rms_error:g}), max relative error {parity['rel']:.3g}; "
                 f"held-out image PSNR {parity['image_psnr_db']:.1f} dB")
        if not parity["rms_rel"] <= max_rms_error:
            raise QuantizeError(f"the int8 U-Net differs from the fp32 graph by {parity['rms_rel']:.3g} (rms relative "
                                f"error over a held-out run), above the threshold {max_rms_error:g}")
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
    return xml, parity


def _parity(core: Any, int8_xml: Path, fp32_graph: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """The int8 model at the CPU's default inference precision (what the runtime runs) against
    the fp32 graph at f32, on every feed: worst max-relative error and the overall rms ratio."""
    from runtime.engines.openvino import DEVICE, PRECISIONS, default_precision

    precision = default_precision()
    test = core.compile_model(core.read_model(str(int8_xml)), DEVICE,
                              {"INFERENCE_PRECISION_HINT": PRECISIONS[precision][0]})
    ref = core.compile_model(core.read_model(str(fp32_graph)), DEVICE, {"INFERENCE_PRECISION_HINT": "f32"})
    worst, sq_err, sq_ref = 0.0, 0.0, 0.0
    for f in feeds:
        a = np.asarray(test(f)[0], dtype=np.float64)
        b = np.asarray(ref(f)[0], dtype=np.float64)
        worst = max(worst, rel_err(a, b))
        sq_err += float(((a - b) ** 2).sum())
        sq_ref += float((b ** 2).sum())
    return {"rel": worst, "rms_rel": (sq_err / max(sq_ref, 1e-30)) ** 0.5, "calls": len(feeds),
            "inference_precision": precision}

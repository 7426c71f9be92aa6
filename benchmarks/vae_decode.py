"""Where the VAE decode's time goes, and what the two graph changes that make it cheaper buy.

    python -m benchmarks.vae_decode [--sizes 256 512] [--repeats 3] [--out FILE.json]

Exports SD 1.5's VAE decoder (random weights, torch seed 0; speed does not depend on the values)
twice into a scratch folder: as diffusers computes it (nearest x2 upsampling, then a 3x3 conv) and
as `build-engine` exports it now (each upsampler one stride-2 transposed conv, export/upsample.py).
Then, at each image size, it runs:
- OpenVINO (CPU plugin, the engine's compile settings) at f32 and, where the CPU has it, bf16, with
  and without the layout-free GroupNorm rewrite (runtime/engines/ov_group_norm.py), each with
  OpenVINO's per-node profile summed by operation type;
- ONNX Runtime (CPU, the runtime's engine) on both graphs.
For each: the best of `--repeats` calls after one warm-up, and the maximum relative difference from
the as-diffusers graph on OpenVINO f32 (the same random latent).

The report also counts the decoder's multiply-adds (`torch.utils.flop_counter` on the meta device)
for both forms and divides the f32 convolution time by the rate OpenVINO reaches on one large f32
MatMul (benchmarks/ceiling.py): at 1.0 or more the convolutions already run as fast as
OpenVINO multiplies large matrices on this CPU, and only fewer multiply-adds can make them faster.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import measure
from runtime.compare import rel_err

FORMS = ("upsample+conv", "transposed")
SEED = 0


def _decoder(transposed: bool):
    import torch

    from export.configs import preset
    from export.onnx_export import VAEDecoderWrapper
    from export.upsample import transposed_upsamplers
    from export.vae import AutoencoderKL

    spec = preset("sd15")
    torch.manual_seed(SEED)
    vae = AutoencoderKL(spec.vae).eval().requires_grad_(False)
    return spec, VAEDecoderWrapper(transposed_upsamplers(vae) if transposed else vae, spec.vae.scaling_factor).eval()


def export(out: Path) -> dict[str, Path]:
    """vae_decoder.onnx in both forms under `out/<form>/`."""
    import torch

    from runtime.folder.networks import network_io

    paths = {}
    for form in FORMS:
        spec, module = _decoder(form == "transposed")
        inputs, outputs = network_io("vae_decoder", spec.dims, "fp32")
        axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*inputs, *outputs)}
        folder = out / form.replace("+", "-")
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            torch.onnx.export(module, (torch.randn(1, 4, 16, 24),), str(folder / "vae_decoder.onnx"),
                              input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                              dynamic_axes=axes, opset_version=17, do_constant_folding=True, dynamo=False)
        paths[form] = folder / "vae_decoder.onnx"
    return paths


def multiply_adds(size: int) -> dict[str, dict[str, float]]:
    """GMAC of one decode at `size` px, by operator, for both forms."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for form in FORMS:
        with torch.device("meta"):
            _, module = _decoder(form == "transposed")
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                module(torch.zeros(1, 4, size // 8, size // 8))
        by_op = {str(op).split(".")[-1]: flops / 2e9 for op, flops in counter.get_flop_counts()["Global"].items()}
        counts[form] = {"total": counter.get_total_flops() / 2e9, **by_op}
    return counts


def _time(call, repeats: int) -> float:
    """Best of `repeats` timed calls after one warm-up."""
    return measure(call, repeats=repeats, warmup=1)["min_s"]


def openvino_run(path: Path, size: int, precision: str, rewrite: bool, latent: np.ndarray,
                 repeats: int) -> dict[str, Any]:
    import openvino as ov

    from runtime.engines.openvino import DEVICE, PRECISIONS
    from runtime.engines.ov_group_norm import layout_free_group_norms

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({"latent": list(latent.shape)})
    rewritten = layout_free_group_norms(model) if rewrite else 0
    compiled = core.compile_model(model, DEVICE, {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True,
                                                  "INFERENCE_PRECISION_HINT": PRECISIONS[precision][0]})
    request = compiled.create_infer_request()
    seconds = _time(lambda: request.infer({"latent": latent}), repeats)
    image = request.get_output_tensor(0).data.copy()
    by_type: collections.Counter = collections.Counter()
    for node in request.profiling_info:
        by_type[node.node_type] += node.real_time.total_seconds()
    total = sum(by_type.values())
    profile = {k: {"s": round(v, 4), "share": round(v / total, 3)} for k, v in by_type.most_common() if v > 0}
    return {"seconds": seconds, "group_norms_rewritten": rewritten, "profile": profile}, image


def onnxruntime_run(path: Path, latent: np.ndarray, repeats: int) -> tuple[dict[str, Any], np.ndarray]:
    from export.configs import preset
    from runtime.engines.onnxruntime import OrtEngine
    from runtime.folder.networks import network_io

    inputs, outputs = network_io("vae_decoder", preset("sd15").dims, "fp32")
    engine = OrtEngine(path, "vae_decoder", inputs, outputs, providers=["cpu"])
    result = {}
    seconds = _time(lambda: result.update(engine.run({"latent": latent})), repeats)
    return {"seconds": seconds}, result["image"]


def run(sizes: list[int], repeats: int, scratch: Path) -> dict[str, Any]:
    from benchmarks.ceiling import gemm_tflops
    from benchmarks.machine import machine
    from runtime.engines.openvino import cpu_capabilities

    paths = export(scratch)
    precisions = ["f32"] + (["bf16"] if "BF16" in cpu_capabilities() else [])
    rate = gemm_tflops("f32")
    rows, macs = [], {}
    for size in sizes:
        latent = np.random.default_rng(SEED).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
        macs[size] = multiply_adds(size)
        reference = None
        for form in FORMS:
            for precision in precisions:
                for rewrite in (False, True):
                    row, image = openvino_run(paths[form], size, precision, rewrite, latent, repeats)
                    if reference is None:
                        reference = image  # as diffusers, OpenVINO f32, no rewrite: the first row
                    row.update(size=size, form=form, engine="openvino", precision=precision, group_norm_rewrite=rewrite)
                    row["rel_diff"] = rel_err(image, reference)
                    rows.append(row)
                    print(_line(row), flush=True)
            row, image = onnxruntime_run(paths[form], latent, repeats)
            row.update(size=size, form=form, engine="onnxruntime", precision="f32", group_norm_rewrite=False,
                       rel_diff=rel_err(image, reference))
            rows.append(row)
            print(_line(row), flush=True)
    for row in rows:
        if row["engine"] == "openvino" and row["precision"] == "f32":
            conv = sum(v["s"] for k, v in row["profile"].items() if k.startswith("Convolution"))
            gmac = sum(v for k, v in macs[row["size"]][row["form"]].items() if k.startswith("convolution"))
            row["conv_s"] = conv
            row["conv_rate_vs_gemm"] = round(2 * gmac / 1e3 / conv / rate, 3) if conv else None
    return {"machine": machine(), "sizes": sizes, "repeats": repeats, "gemm_f32_tflops": rate,
            "gmac": {str(k): v for k, v in macs.items()}, "rows": rows}


def _line(row: dict[str, Any]) -> str:
    gn = " gn-rewrite" if row["group_norm_rewrite"] else ""
    return (f"{row['size']:4d} px  {row['form']:13s}  {row['engine']:11s} {row['precision']:4s}{gn:11s} "
            f"{row['seconds']:.3f} s  rel diff {row['rel_diff']:.1e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vae_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if any(s <= 0 or s % 8 for s in args.sizes):
        p.error("--sizes must be positive multiples of 8")
    with tempfile.TemporaryDirectory(prefix="vae-decode-") as scratch:
        result = run(args.sizes, args.repeats, Path(scratch))
    for size in args.sizes:
        gmac = result["gmac"][str(size)]
        print(f"{size} px: {gmac['upsample+conv']['total']:.1f} GMAC as diffusers, "
              f"{gmac['transposed']['total']:.1f} transposed")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

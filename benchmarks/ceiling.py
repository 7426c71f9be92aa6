"""How fast can one U-Net call be on this CPU at a given arithmetic? A floor from first principles.

The floor is the U-Net's arithmetic (multiply-adds of every convolution, linear layer and attention
product, counted by `torch.utils.flop_counter` on the meta device, so no weights are allocated)
divided by the best throughput OpenVINO's CPU plugin reaches on one large square MatMul at each
inference precision. A real network runs below that GEMM rate (small layers, normalizations,
reorders), so its time is above the floor; an engine near the floor can only get faster by doing
cheaper arithmetic (int8), not by better kernels.

    python -m benchmarks.ceiling [--model sd15] [--resolution 256] [--batch 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GEMM_SIZE = 2048  # square MatMul: large enough to be compute-bound, small enough to stay in memory
REPEATS = 10


def unet_gflop(model: str, resolution: int, batch: int) -> dict[str, float]:
    """GFLOP (2 per multiply-add) of one U-Net call at the guidance batch 2 x batch, by operator."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from export.configs import preset
    from export.unet import UNet2DConditionModel

    spec = preset(model)
    with torch.device("meta"):
        unet = UNet2DConditionModel(spec.unet).eval()
        lat = resolution // spec.vae_scale_factor
        n = 2 * batch
        sample = torch.zeros(n, spec.unet.in_channels, lat, lat)
        timestep = torch.zeros(n)
        context = torch.zeros(n, spec.dims.text_max_length, spec.unet.cross_attention_dim)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(sample, timestep, context)
    by_op = {str(op).split(".")[-1]: flops / 1e9 for op, flops in counter.get_flop_counts()["Global"].items()}
    return {"total": counter.get_total_flops() / 1e9, **by_op}


def gemm_tflops(precision: str, size: int = GEMM_SIZE, repeats: int = REPEATS) -> float:
    """Best TFLOP/s of an OpenVINO CPU MatMul [size, size] x [size, size] at `precision`."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([size, size], np.float32, name="a")
    w = ops.constant(rng.standard_normal((size, size)).astype(np.float32))
    model = ov.Model([ops.matmul(a, w, False, False)], [a])
    compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    feed = {"a": rng.standard_normal((size, size)).astype(np.float32)}
    for _ in range(3):
        request.infer(feed)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer(feed)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def ceiling(model: str = "sd15", resolution: int = 256, batch: int = 1) -> dict[str, Any]:
    from runtime.engines.openvino import cpu_capabilities

    flops = unet_gflop(model, resolution, batch)
    precisions = ["f32"] + (["bf16"] if "BF16" in cpu_capabilities() else [])
    rates = {p: gemm_tflops(p) for p in precisions}
    return {"model": model, "resolution": resolution, "unet_batch": 2 * batch, "unet_gflop": flops,
            "gemm_tflops": rates, "gemm_size": GEMM_SIZE,
            "unet_floor_s": {p: flops["total"] / 1e3 / r for p, r in rates.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = ceiling(args.model, args.resolution, args.batch)
    print(f"{args.model} U-Net, {args.resolution}x{args.resolution}, batch {result['unet_batch']}: "
          f"{result['unet_gflop']['total']:.1f} GFLOP per call "
          f"({', '.join(f'{k} {v:.1f}' for k, v in result['unet_gflop'].items() if k != 'total')})")
    for precision, rate in result["gemm_tflops"].items():
        print(f"  {precision}: OpenVINO {GEMM_SIZE}^3 MatMul {rate:.3f} TFLOP/s -> U-Net floor "
              f"{result['unet_floor_s'][precision]:.3f} s per call")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

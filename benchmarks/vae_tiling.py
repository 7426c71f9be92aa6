"""Tiled VAE (runtime/imaging/tiling.py) on the full-size SD 1.5 VAE: PSNR against the untiled decode,
and peak memory with and without tiling, each measurement in its own process.

    python -m benchmarks.vae_tiling export --out /tmp/vae15               # random weights, seed 0 (~1 min)
    python -m benchmarks.vae_tiling psnr --dir /tmp/vae15 --size 512 --tile 32 48   # tiled vs untiled, ONNX Runtime
    python -m benchmarks.vae_tiling rss --dir /tmp/vae15 --size 1024            # untiled peak RSS
    python -m benchmarks.vae_tiling rss --dir /tmp/vae15 --size 1024 --tile 64  # tiled peak RSS
    python -m benchmarks.vae_tiling psnr --dir engines/tiny --scale 4 --size 128 --tile 16 24 --overlap 4
    python -m benchmarks.vae_tiling diagnose --model tiny --size 128 --tile 16 --overlap 4   # GroupNorm's share

`--dir` is a folder with vae_decoder.onnx / vae_encoder.onnx following runtime/folder/networks.py (an
engine folder works). The graphs are run by the runtime's ONNX Runtime engine (CPU). Peak RSS is
the process's `ru_maxrss`; a watchdog ends the process if its RSS passes `--limit-gb`.

Two kinds of latents are decoded for the PSNR: Gaussian noise (what the random-weight model's
latent space looks like to it: no structure) and the encoder's mean of a synthetic picture (flat
coloured discs on a flat background), whose statistics vary across the image as a real picture's do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

from runtime.compare import psnr, rel_err


def _ort_engine(folder: Path, network: str, dims):
    from runtime.engines.onnxruntime import OrtEngine
    from runtime.folder.networks import network_io

    inputs, outputs = network_io(network, dims, "fp32")
    return OrtEngine(folder / f"{network}.onnx", network, inputs, outputs, providers=["cpu"])


def _dims(scale: int):
    from runtime.folder.networks import ModelDims

    return ModelDims(latent_channels=4, unet_in_channels=4, vae_scale_factor=scale, text_hidden_size=768)


def export(out: Path, seed: int) -> None:
    """vae_decoder.onnx and vae_encoder.onnx of the SD 1.5 VAE with random weights (torch seed)."""
    import torch

    from export.configs import preset
    from export.vae import AutoencoderKL
    from runtime.folder.networks import network_io

    spec = preset("sd15")
    torch.manual_seed(seed)
    vae = AutoencoderKL(spec.vae).eval().requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)

    class Decoder(torch.nn.Module):
        def forward(self, latent):
            return vae.decode(latent / spec.vae.scaling_factor)

    class Encoder(torch.nn.Module):
        def forward(self, image):
            return vae.encode(image)

    for network, module, example in (("vae_decoder", Decoder(), torch.randn(1, 4, 16, 24)),
                                     ("vae_encoder", Encoder(), torch.rand(1, 3, 128, 192) * 2 - 1)):
        inputs, outputs = network_io(network, spec.dims, "fp32")
        axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*inputs, *outputs)}
        with torch.no_grad():
            torch.onnx.export(module, (example,), str(out / f"{network}.onnx"), input_names=[t.name for t in inputs],
                              output_names=[t.name for t in outputs], dynamic_axes=axes, opset_version=17,
                              do_constant_folding=True, dynamo=False)
            reference = module(example)
        got = _ort_engine(out, network, spec.dims).run({inputs[0].name: example.numpy()})
        ref = reference if isinstance(reference, tuple) else (reference,)
        err = max(rel_err(got[t.name], r.numpy()) for t, r in zip(outputs, ref))
        print(f"{network}: exported, ONNX Runtime vs torch max relative error {err:.2e}")


def _discs(size: int, rng: np.random.Generator) -> np.ndarray:
    """[3, size, size] in [-1, 1]: coloured discs on a flat background."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((3, size, size), np.float32)
    img[:] = np.array([-1.0, -1.0, 1.0], np.float32)[:, None, None]
    for _ in range(8):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        img[:, (yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.choice([-1.0, 1.0], size=3)[:, None]
    return img


def signed_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of decoder outputs in [-1, 1] after clipping there (peak-to-peak 2, as the 8-bit image would be)."""
    return psnr(a, b, data_range=2.0, clip=(-1.0, 1.0))


def measure_psnr(folder: Path, size: int, scale: int, tiles: list[int], overlap: int, scaling_factor: float) -> dict:
    from runtime.imaging.tiling import decode_tiled

    dims = _dims(scale)
    decoder = _ort_engine(folder, "vae_decoder", dims)
    encoder = _ort_engine(folder, "vae_encoder", dims)
    run = lambda z: decoder.run({"latent": z})["image"]
    rng = np.random.default_rng(0)
    lat = size // scale
    cases = {"gaussian": rng.standard_normal((1, 4, lat, lat), dtype=np.float32),
             "encoded_discs": encoder.run({"image": _discs(size, rng)[None]})["latent_mean"]
             * np.float32(scaling_factor)}
    out = {}
    for name, z in cases.items():
        t0 = time.perf_counter()
        full = run(z)
        out[name] = {"untiled_s": round(time.perf_counter() - t0, 2),
                     "image_std": round(float(np.clip(full, -1, 1).std()), 4)}
        for tile in tiles:
            t0 = time.perf_counter()
            tiled = decode_tiled(run, z, tile=tile, overlap=overlap, scale=scale)
            out[name][f"tile{tile}_overlap{overlap}"] = {"psnr_db": round(signed_psnr(full, tiled), 2),
                                                        "tiled_s": round(time.perf_counter() - t0, 2)}
    return out


def diagnose(model: str, size: int, tile: int, overlap: int) -> dict:
    """Where the tiled decode's error comes from, in the PyTorch reference VAE, on encoded discs:
    PSNR of the tiled decode (1) as is; (2) with every GroupNorm of every tile normalising with the
    statistics of the whole image (forward hooks replace each GroupNorm's output); (3) as (2) with
    the decoder's mid-block self-attention, its only other non-local operation, removed from both
    the tiled and the untiled decode. What (3) still misses comes from the tiles' borders."""
    import torch

    from export.configs import preset
    from export.loading.read import load_model
    from export.vae import AutoencoderKL

    if model == "tiny":
        vae = load_model("tiny").vae
    else:
        torch.manual_seed(0)  # the weights `export --seed 0` writes
        vae = AutoencoderKL(preset(model).vae).eval().requires_grad_(False)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(_discs(size, np.random.default_rng(0))[None]))[0].numpy()
        out = {"model": model, "size": size, "tile": tile, "overlap": overlap}
        for name, shared_norm, attention in (("per_tile_groupnorm", False, True), ("whole_image_groupnorm", True, True),
                                             ("whole_image_groupnorm_no_attention", True, False)):
            out[f"psnr_db_{name}"] = round(_hooked_psnr(vae, z, scale, tile, overlap, shared_norm, attention), 2)
    return out


def _hooked_psnr(vae, z: np.ndarray, scale: int, tile: int, overlap: int, shared_norm: bool, attention: bool) -> float:
    import torch

    from export.vae import SpatialSelfAttention
    from runtime.imaging.tiling import decode_tiled

    stats: dict = {}
    tiling = [False]

    def norm_hook(module, args, output):
        x = args[0]
        groups = x.reshape(x.shape[0], module.num_groups, -1)
        if not tiling[0]:
            stats[module] = (groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True))
            return output
        mean, var = stats[module]
        y = ((groups - mean) / torch.sqrt(var + module.eps)).reshape(x.shape)
        return y * module.weight[None, :, None, None] + module.bias[None, :, None, None]

    modules = list(vae.decoder.modules())
    handles = [m.register_forward_hook(norm_hook) for m in modules if shared_norm and isinstance(m, torch.nn.GroupNorm)]
    handles += [m.register_forward_hook(lambda module, args, output: args[0])  # identity instead of x + attention
                for m in modules if not attention and isinstance(m, SpatialSelfAttention)]
    decode = lambda latents: vae.decode(torch.from_numpy(latents)).numpy()
    try:
        full = decode(z)  # with shared_norm: records the whole image's statistics
        tiling[0] = True
        return signed_psnr(full, decode_tiled(decode, z, tile=tile, overlap=overlap, scale=scale))
    finally:
        for h in handles:
            h.remove()


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _watchdog(limit: int) -> None:
    def watch() -> None:
        while True:
            if _rss_bytes() > limit:
                print(json.dumps({"error": f"RSS passed {limit / 2**30:.1f} GiB; stopped"}), flush=True)
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def measure_rss(folder: Path, size: int, scale: int, tile: int | None, overlap: int, limit: int) -> dict:
    from runtime.imaging.tiling import decode_tiled

    _watchdog(limit)
    decoder = _ort_engine(folder, "vae_decoder", _dims(scale))
    z = np.random.default_rng(0).standard_normal((1, 4, size // scale, size // scale), dtype=np.float32)
    before = _rss_bytes()
    run = lambda x: decoder.run({"latent": x})["image"]
    t0 = time.perf_counter()
    image = run(z) if tile is None else decode_tiled(run, z, tile=tile, overlap=overlap, scale=scale)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"size": size, "tile": tile, "overlap": overlap if tile else None, "image_shape": list(image.shape),
            "rss_before_decode_mib": round(before / 2**20), "peak_rss_mib": round(peak / 2**20),
            "decode_s": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vae_tiling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("diagnose")
    d.add_argument("--model", choices=("sd15", "tiny"), default="tiny")
    d.add_argument("--size", type=int, default=128)
    d.add_argument("--tile", type=int, default=16)
    d.add_argument("--overlap", type=int, default=4)
    for name in ("psnr", "rss"):
        s = sub.add_parser(name)
        s.add_argument("--dir", type=Path, required=True)
        s.add_argument("--size", type=int, default=512 if name == "psnr" else 1024)
        s.add_argument("--scale", type=int, default=8)
        if name == "psnr":
            s.add_argument("--tile", type=int, nargs="+", default=[32], help="tile sizes (latent pixels)")
        else:
            s.add_argument("--tile", type=int, default=None, help="tile size (latent pixels); none: untiled")
        s.add_argument("--overlap", type=int, default=16)
        s.add_argument("--scaling-factor", type=float, default=0.18215)
        s.add_argument("--limit-gb", type=float, default=8.0)
    args = p.parse_args(argv)
    if args.cmd == "export":
        export(args.out, args.seed)
    elif args.cmd == "diagnose":
        print(json.dumps(diagnose(args.model, args.size, args.tile, args.overlap)))
    elif args.cmd == "psnr":
        print(json.dumps(measure_psnr(args.dir, args.size, args.scale, args.tile, args.overlap, args.scaling_factor)))
    else:
        print(json.dumps(measure_rss(args.dir, args.size, args.scale, args.tile, args.overlap,
                                     int(args.limit_gb * 2**30))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

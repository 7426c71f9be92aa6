"""`build-engine`: turn a model (preset, diffusers folder or single-file checkpoint) into an engine
folder: the four ONNX graphs, the tokenizer files and `manifest.json` (runtime/folder/manifest.py), plus
the plans of a backend that needs its own (TensorRT).

    build-engine sd15.safetensors --out engines/sd15 --precision fp16 --tensorrt
    build-engine sd15.safetensors --out engines/sd15-int8 --quantize int8   # + int8 U-Net for OpenVINO
    build-engine --verify engines/sd15        # every file against the sha256 its manifest records
    build-engine --prune-cache engines/sd15   # trim the folder's OpenVINO compile cache

The command line of the build (export/build.py `build_engine`: atomic, reusing an up-to-date
folder), and the two commands that check or trim an existing engine folder instead of building
(`verify_folder`, `prune_cache`). The first paragraph above is `build-engine --help`'s description.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.build import STEP_CACHE_DEFAULT, BuildError, Progress, build_engine
from runtime.folder.manifest import MANIFEST_NAME, PREDICTION_TYPES, ManifestError, load_manifest, write_manifest
from runtime.folder.networks import PRECISIONS


# --- commands on an existing engine folder ---------------------------------------------------------

def verify_folder(folder: str | os.PathLike, progress: Progress = print) -> Any:
    """`build-engine --verify DIR`: check every file of an engine folder against the full sha256 its
    manifest records (and every path's containment; runtime/folder/paths.py `check_folder` with verify=True).
    A folder built before file fingerprints gets its files table recorded once every sha256 matched, so
    later loads check sizes and fingerprints. Returns the `FolderCheck`; raises ManifestError or
    IntegrityError naming the first file that does not match."""
    from runtime.folder.paths import check_folder

    folder = Path(folder)
    manifest = load_manifest(folder)
    check = check_folder(folder, manifest, verify=True)
    progress(f"verified {folder}: {check.files} files, {check.bytes_read / 1e9:.2f} GB hashed in {check.seconds:.1f} s; "
             "every file matches its sha256 in the manifest")
    if check.mode == "legacy":
        write_manifest(folder, manifest, record_files=True)
        progress(f"recorded the size and fingerprint of every file in {folder / MANIFEST_NAME} (it predated them), "
                 "so each load now checks them")
    return check


def prune_cache(engine_dir: Path, limit_gb: float | None, progress: Callable[[str], None]) -> None:
    """`build-engine --prune-cache DIR`: trim the folder's OpenVINO compile cache now."""
    from runtime.engines import ov_cache
    from runtime.folder.paths import inside

    if (engine_dir / ov_cache.SUBDIR).exists():  # never delete through a symlink that leads elsewhere
        inside(engine_dir, ov_cache.SUBDIR, "the OpenVINO compile cache", kind="dir")
    limit = None if limit_gb is None else int(limit_gb * 1e9)
    freed, left = ov_cache.prune(engine_dir, limit)
    progress(f"{engine_dir / ov_cache.SUBDIR}: freed {freed / 1e6:.1f} MB, {left / 1e6:.1f} MB left")


# --- command line --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:  # long: one argparse declaration per build option
    parser = argparse.ArgumentParser(prog="build-engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="diffusers folder, single-file checkpoint (.safetensors/.ckpt) or "
                                                  "preset name (`tiny` = embedded demo model; other presets get "
                                                  "random weights)")
    parser.add_argument("--out", type=Path, help="engine folder to write")
    parser.add_argument("--verify", type=Path, metavar="DIR",
                        help="instead of building, check every file of the engine folder DIR against its sha256 in "
                             "the manifest (see docs/security.md); exit status 1 names the first mismatch")
    parser.add_argument("--prune-cache", type=Path, metavar="DIR",
                        help="instead of building, trim the OpenVINO compile cache of the engine folder DIR to "
                             "--cache-limit-gb (default: 29%% of its graphs' size), least recently used first")
    parser.add_argument("--cache-limit-gb", type=float, default=None, metavar="GB",
                        help="with --prune-cache: the size to trim to (0 empties the cache)")
    parser.add_argument("--tensorrt", action="store_true",
                        help="also build TensorRT plans for this machine's NVIDIA GPU (needs sd-runtime[tensorrt]); "
                             "the folder runs on every CPU backend either way")
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)  # deprecated: build._deprecated_backend
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    for key in ("min-image", "opt-image", "max-image"):
        parser.add_argument(f"--{key}", type=int, default=None, help="pixels (default: from the model's size)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    parser.add_argument("--quantize", choices=("int8", "int8-weights"), default=None,
                        help="int8: also build an int8 U-Net for the OpenVINO CPU engine, calibrated on denoising "
                             "runs (faster, less exact); int8-weights: int8 weights for the U-Net and text encoder "
                             "(about 4x less weight memory). Needs sd-runtime[quantize]; fp32 only; see "
                             "docs/benchmarks.md")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="merge a LoRA (.safetensors, kohya or diffusers layout) into the weights, scaled by "
                             "SCALE (default 1); repeatable")
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                        help="add a textual-inversion embedding (.pt or .safetensors) as TOKEN (default: the file's "
                             "stem); repeatable")
    parser.add_argument("--step-cache", action=argparse.BooleanOptionalAction, default=STEP_CACHE_DEFAULT,
                        help="also export the DeepCache U-Nets (unet_deep, unet_shallow) that runs with a cache "
                             "interval > 1 need; they share the unet's weights file")
    parser.add_argument("--cache-branch", type=int, default=0, metavar="N",
                        help="skip branch the step cache keeps (0, the default: the shallowest, DeepCache's "
                             "cache_branch_id)")
    parser.add_argument("--controlnet", action="append", default=[], metavar="PATH[:NAME]",
                        help="add a ControlNet (a diffusers ControlNetModel folder, or an A1111 / lllyasviel single "
                             "file such as control_v11p_sd15_canny.safetensors; .pth read weights-only) as the "
                             "graph controlnet.NAME (NAME: the file's stem by default), with unet_control, the "
                             "U-Net taking its residuals; repeatable")
    parser.add_argument("--tiling", action="store_true",
                        help="also export the U-Net and VAE with circular padding (unet_tiled, vae_decoder_tiled, "
                             "vae_encoder_tiled; seamless textures: tiling=True, A1111's `tiling`), sharing their "
                             "weights files")
    parser.add_argument("--tiny-vae", default=None, metavar="PATH",
                        help="add a tiny autoencoder (TAESD) beside the VAE: a diffusers AutoencoderTiny folder, or "
                             "madebyollin's taesd_encoder.safetensors / taesd_decoder.safetensors (a folder holding "
                             "them, or either file); runs with vae='tiny' / --vae tiny and decodes live previews")
    parser.add_argument("--vae", default=None, metavar="PATH",
                        help="replace the source's VAE with another AutoencoderKL before export: a diffusers "
                             "AutoencoderKL folder (e.g. madebyollin/sdxl-vae-fp16-fix; its config.json's "
                             "scaling_factor and force_upcast apply) or a single VAE file (*.vae.safetensors, "
                             "*.vae.pt; LDM or diffusers keys; the source's VAE config completes it)")
    parser.add_argument("--default-steps", type=int, default=None, metavar="N",
                        help="recommended steps recorded in the folder (default: from its scheduler config: LCM 4, "
                             "trailing Euler (Turbo, Lightning, Hyper-SD) 1, others none)")
    parser.add_argument("--default-guidance", type=float, default=None, metavar="G",
                        help="recommended guidance scale recorded in the folder (default: LCM 8.5, trailing Euler 0)")
    parser.add_argument("--default-sampler", default=None, metavar="NAME",
                        help="recommended sampler recorded in the folder (default: its scheduler config's)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    args = parser.parse_args(argv)
    if args.verify is None and args.prune_cache is None and (args.source is None or args.out is None):
        parser.error("SOURCE and --out are required (or --verify DIR, or --prune-cache DIR)")
    if args.cache_limit_gb is not None and (args.prune_cache is None or args.cache_limit_gb < 0):
        parser.error("--cache-limit-gb goes with --prune-cache DIR and is >= 0")

    from export.loading.read import CheckpointError
    from export.onnx_export import ParityError
    from export.quantize import QuantizeError

    def progress(line: str) -> None:
        print(line, flush=True)

    try:
        if args.verify is not None:
            verify_folder(args.verify, progress)
            return 0
        if args.prune_cache is not None:
            prune_cache(args.prune_cache, args.cache_limit_gb, progress)
            return 0
        build_engine(args.source, args.out, tensorrt=args.tensorrt, backend=args.backend, precision=args.precision,
                     min_image=args.min_image,
                     opt_image=args.opt_image, max_image=args.max_image, min_batch=args.min_batch,
                     opt_batch=args.opt_batch, max_batch=args.max_batch, prediction_type=args.prediction_type,
                     seed=args.seed, quantize=args.quantize, force=args.force, progress=progress,
                     loras=args.lora, embeddings=args.embedding, step_cache=args.step_cache,
                     cache_branch=args.cache_branch, tiling=args.tiling,
                     tiny_vae=args.tiny_vae, default_steps=args.default_steps,
                     default_guidance=args.default_guidance, default_sampler=args.default_sampler,
                     controlnets=args.controlnet, vae=args.vae)
    except (BuildError, CheckpointError, ParityError, QuantizeError, ManifestError, OSError, ValueError,
            RuntimeError) as e:
        print(f"build-engine: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m runtime` / `sd-generate`: txt2img, img2img and inpaint from an engine folder to PNG files.

    sd-generate txt2img ENGINE_DIR "a red barn" --steps 30 --seed 7 -o barn.png
    sd-generate ENGINE_DIR "a red barn"      # txt2img; an LCM / Turbo folder's recommended steps and guidance
    sd-generate img2img ENGINE_DIR "a red barn, winter" --image barn.png --strength 0.6 -o winter.png
    sd-generate inpaint ENGINE_DIR "a blue door" --image barn.png --mask door.png -o door.png

Each PNG carries text chunks with what reproduces it (prompt, negative prompt, seed, steps, scheduler,
guidance, size, strength, engine folder, backend), the whole as JSON under the key `sd-runtime`
(`read_metadata(path)` reads it back), and AUTOMATIC1111's `parameters` chunk (runtime/imaging/png_info.py),
which A1111's "PNG Info" and other tools read.

    sd-generate --from-png barn.png -o again.png               # reproduce an image we made
    sd-generate --from-png barn.png --steps 40 -o more.png     # flags given override the PNG
    sd-generate txt2img ENGINE_DIR --from-png a1111.png        # an A1111 PNG: name the engine folder

`--from-png` reads our `sd-runtime` JSON where the PNG has it (bit-identical reproduction: same
engine folder, backend, settings and seed), else the A1111 `parameters` chunk (A1111's settings;
the image differs from A1111's, whose sampler steps and random numbers are not ours). COMMAND,
ENGINE_DIR and PROMPT may then be left out. Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from runtime.imaging import png_info

METADATA_KEY = "sd-runtime"
COMMANDS = ("txt2img", "img2img", "inpaint")
# argument -> the metadata key it sets (what --from-png reads, and flags given override)
_ARG_KEYS = {"command": "mode", "engine_dir": "engine", "prompt": "prompt", "negative_prompt": "negative_prompt",
             "steps": "steps", "guidance": "guidance_scale", "guidance_rescale": "guidance_rescale",
             "scheduler": "scheduler", "karras": "karras", "eta": "eta", "seed": "seed", "height": "height",
             "width": "width", "image": "image", "mask": "mask", "strength": "strength", "backend": "backend",
             "cache_interval": "cache_interval", "cache_schedule": "cache_schedule", "prompt_syntax": "prompt_syntax",
             "tiling": "tiling", "vae": "vae", "timestep_spacing": "timestep_spacing"}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "sd-generate") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Generate images from a Stable Diffusion engine folder.")
    p.add_argument("command", choices=COMMANDS, nargs="?", help="what to generate")
    p.add_argument("engine_dir", metavar="ENGINE_DIR", nargs="?", help="engine folder (built by build-engine)")
    p.add_argument("prompt", metavar="PROMPT", nargs="?", help="the prompt (longer than 77 tokens is fine)")
    p.add_argument("--from-png", metavar="FILE", default=None,
                   help="take the settings of a PNG written by sd-generate or AUTOMATIC1111; flags given override them")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: none)")
    p.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt (default: the prompt)")
    p.add_argument("--negative-prompt-2", default=None,
                   help="SDXL: the second text encoder's negative prompt (default: the negative prompt)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the folder's recommended, else 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the folder's recommended, else 7.5)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale phi (default: 0)")
    p.add_argument("--scheduler", default=None, help="sampler name (default: the engine's scheduler)")
    karras = p.add_mutually_exclusive_group()
    karras.add_argument("--karras", dest="karras", action="store_true", default=None, help="Karras sigmas")
    karras.add_argument("--no-karras", dest="karras", action="store_false", help="no Karras sigmas")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta, or TCD's gamma in [0, 1] (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: random, printed and stored)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels")
    p.add_argument("--width", type=int, default=None, help="image width in pixels")
    p.add_argument("--image", default=None, help="init image (img2img, inpaint)")
    p.add_argument("--mask", default=None, help="mask image, white = repaint (inpaint)")
    p.add_argument("--strength", type=float, default=None,
                   help="noise level for the init image, in (0, 1] (default: 0.75 img2img, 1.0 inpaint)")
    p.add_argument("--num-images", type=int, default=None, help="images to generate (default: 1)")
    p.add_argument("--backend", default=None, help="engine backend (default: best available)")
    p.add_argument("--cache-interval", type=int, default=None,
                   help="step caching (DeepCache): a full U-Net call every N steps, the shallow graph between "
                        "(default 1 = off; the folder needs build-engine --step-cache)")
    p.add_argument("--cache-schedule", choices=("uniform", "nonuniform"), default=None,
                   help="which calls are full: every N (uniform, default) or DeepCache's non-uniform schedule")
    p.add_argument("--prompt-syntax", choices=("a1111", "none"), default=None,
                   help="A1111 emphasis (word:1.2), [word] and BREAK (a1111, default) or the prompt as plain text")
    p.add_argument("--vae-tiling", type=_vae_tiling, default=None, metavar="auto|on|off|PIXELS",
                   help="tiled VAE decode/encode: automatic above the folder's VAE size (default), forced on "
                        "(default tile), off, or on with tiles of PIXELS")
    _hires_args(p)
    p.add_argument("--refiner", default=None, metavar="DIR",
                   help="txt2img: an engine folder (an SDXL refiner) that takes over at --refiner-switch-at "
                        "(diffusers' denoising_end / denoising_start hand-over)")
    p.add_argument("--refiner-switch-at", type=float, default=None, metavar="F",
                   help="the fraction of the steps the engine folder runs before the refiner (default 0.8)")
    p.add_argument("--tiling", action="store_const", const=True, default=None,
                   help="seamless texture: circular padding in the U-Net and VAE (A1111's Tiling; the folder "
                        "needs build-engine --tiling)")
    p.add_argument("--timestep-spacing", choices=("leading", "trailing", "linspace"), default=None,
                   help="replace the folder's timestep spacing (A1111's schedule type SGM Uniform is trailing)")
    p.add_argument("--vae", choices=("full", "tiny"), default=None,
                   help="autoencoder: the folder's own (full, default) or its tiny one (TAESD: build-engine --tiny-vae)")
    p.add_argument("--control-image", action="append", default=[], metavar="FILE[:NAME[:SCALE]]",
                   help="a ControlNet's control image (your own map: edges, depth, pose...), for the folder's "
                        "ControlNet NAME (default: its only one) at SCALE (default 1.0); repeatable: several "
                        "ControlNets, residuals summed")
    p.add_argument("-o", "--output", default=None, help="output PNG (default: COMMAND.png); "
                   "with several images, -0, -1, ... are added before the suffix")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _hires_args(p: argparse.ArgumentParser) -> None:
    """txt2img's hires fix (runtime/hires.py; A1111's hr_* fields): any of these turns it on."""
    g = p.add_argument_group("hires fix (txt2img: upscale, then img2img at the larger size, in one run)")
    g.add_argument("--hr-scale", type=float, default=None, help="upscale factor (default 2 when another --hr-* is given)")
    g.add_argument("--hr-resize", default=None, metavar="WxH", help="target size instead of --hr-scale (0 keeps the "
                   "aspect ratio: 1024x0)")
    g.add_argument("--hr-upscaler", default=None, help="Latent (default), Latent (antialiased|bicubic|bicubic "
                   "antialiased|nearest|nearest-exact), Lanczos, Nearest or None")
    g.add_argument("--hr-steps", type=int, default=None, help="second-pass steps (default 0: the first pass's)")
    g.add_argument("--hr-strength", type=float, default=None, help="second-pass denoising strength (default 0.7)")
    g.add_argument("--hr-scheduler", default=None, help="second-pass sampler (default: the first pass's)")
    g.add_argument("--hr-prompt", default=None, help="second-pass prompt (default: the prompt)")


def hires_from_args(args: argparse.Namespace) -> Any:
    """The HiresFix of the --hr-* flags, or None when none is given."""
    from runtime.hires import HiresFix

    names = ("hr_scale", "hr_resize", "hr_upscaler", "hr_steps", "hr_strength", "hr_scheduler", "hr_prompt")
    if all(getattr(args, n, None) is None for n in names):
        return None
    if args.command != "txt2img":
        raise ValueError("the --hr-* flags (hires fix) apply to txt2img only")
    settings: dict[str, Any] = {}
    if args.hr_resize is not None:
        w, _, h = args.hr_resize.lower().partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise ValueError(f"--hr-resize: expected WxH in pixels (0 for one side keeps the aspect); got {args.hr_resize!r}")
        settings["resize_width"], settings["resize_height"] = int(w), int(h)
    for arg, name in (("hr_scale", "scale"), ("hr_upscaler", "upscaler"), ("hr_steps", "steps"),
                      ("hr_strength", "strength"), ("hr_scheduler", "scheduler"), ("hr_prompt", "prompt")):
        if getattr(args, arg) is not None:
            settings[name] = getattr(args, arg)
    return HiresFix(**settings)


def control_from_args(values: list[str]) -> dict[str, Any]:
    """`--control-image FILE[:NAME[:SCALE]]` values -> control_image, controlnet and
    controlnet_conditioning_scale lists for the pipeline (none without any). A FILE that exists
    whole is taken as is, colons and all."""
    if not values:
        return {}
    images, names, scales = [], [], []
    for value in values:
        parts = [value] if Path(value).exists() else value.split(":")
        if len(parts) > 3:
            parts = [":".join(parts[:-2])] + parts[-2:]
        file, name, scale = (parts + [None, None])[:3]
        try:
            scales.append(1.0 if scale in (None, "") else float(scale))
        except ValueError:
            raise ValueError(f"--control-image {value}: SCALE {scale!r} is not a number") from None
        images.append(_open_image(file, "--control-image"))
        names.append(name or None)
    return {"control_image": images, "controlnet": names, "controlnet_conditioning_scale": scales}


def _vae_tiling(text: str) -> bool | int | None:
    """--vae-tiling's value as the pipeline's `vae_tiling` (None = automatic)."""
    named = {"auto": None, "on": True, "off": False}
    if text in named:
        return named[text]
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, on, off or a tile size in pixels; got {text!r}") from None


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def metadata_for(params: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The reproducing settings of one image: the result's parameters with its own seed."""
    meta = {k: v for k, v in params.items() if k != "seeds"}
    meta["seed"] = seed
    meta["size"] = f"{params['width']}x{params['height']}"
    if args.image:
        meta["image"] = args.image
    if args.mask:
        meta["mask"] = args.mask
    cmd = ["sd-generate", params["mode"], params["engine"], params["prompt"]]
    if params["negative_prompt"]:
        cmd += ["--negative-prompt", params["negative_prompt"]]
    cmd += ["--steps", str(params["steps"]), "--guidance", repr(params["guidance_scale"]),
            "--scheduler", params["scheduler"], "--seed", str(seed),
            "--height", str(params["height"]), "--width", str(params["width"]), "--backend", params["backend"]]
    if params["guidance_rescale"]:
        cmd += ["--guidance-rescale", repr(params["guidance_rescale"])]
    if params["karras"] is not None:
        cmd += ["--karras" if params["karras"] else "--no-karras"]
    if params["eta"]:
        cmd += ["--eta", repr(params["eta"])]
    if params.get("cache_interval", 1) > 1:
        cmd += ["--cache-interval", str(params["cache_interval"]), "--cache-schedule", params["cache_schedule"]]
    if params.get("prompt_syntax", "a1111") != "a1111":
        cmd += ["--prompt-syntax", params["prompt_syntax"]]
    if "strength" in params:
        cmd += ["--strength", repr(params["strength"])]
    if args.image:
        cmd += ["--image", args.image]
    if args.mask:
        cmd += ["--mask", args.mask]
    if params.get("refiner"):
        cmd += ["--refiner", params["refiner"], "--refiner-switch-at", repr(params["refiner_switch_at"])]
    meta["command"] = shlex.join(cmd)
    return meta


def save_png(image, path: Path, meta: dict[str, Any], infotext: str | None = None) -> None:
    """Write a PIL image as PNG with one text chunk per setting, all of them as JSON, and the A1111
    `parameters` chunk when `infotext` is given."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if infotext is not None:
        info.add_text(png_info.PARAMETERS_KEY, infotext)  # tEXt, or iTXt (UTF-8) beyond Latin-1, as A1111
    for key in ("prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance_scale", "size",
                "strength", "engine", "backend", "command"):
        if key in meta and meta[key] is not None:
            info.add_text(key, str(meta[key]))
    info.add_text(METADATA_KEY, json.dumps(meta, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The settings a PNG written by this CLI carries (the JSON chunk)."""
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", {}) or im.info
        if METADATA_KEY not in text:
            raise ValueError(f"{path} has no {METADATA_KEY} metadata")
        return json.loads(text[METADATA_KEY])


def _open_image(path: str, what: str):
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with Image.open(path) as im:
        im.load()
        return im.copy()


def read_png_settings(path: str | Path) -> tuple[dict[str, Any], str, list[str]]:
    """(settings keyed as our metadata, the chunk they came from, A1111 fields that cannot be
    honoured) of a PNG: our `sd-runtime` JSON where present, else A1111's `parameters`."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"--from-png {path} does not exist")
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or im.info)
    if METADATA_KEY in text:
        return json.loads(text[METADATA_KEY]), METADATA_KEY, []
    if png_info.PARAMETERS_KEY in text:
        settings, ignored = png_info.settings_from_fields(png_info.parse_infotext(text[png_info.PARAMETERS_KEY]))
        return settings, f"A1111 {png_info.PARAMETERS_KEY}", ignored
    raise ValueError(f"--from-png {path} has neither {METADATA_KEY} nor A1111 {png_info.PARAMETERS_KEY} metadata")


def apply_png(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with what the --from-png file says, wherever no flag or positional was given."""
    settings, kind, ignored = read_png_settings(args.from_png)
    merged = vars(args).copy()
    for arg, key in _ARG_KEYS.items():
        if merged[arg] is None and settings.get(key) is not None:
            merged[arg] = settings[key]
    merged["command"] = merged["command"] or "txt2img"
    if merged["command"] == "txt2img":  # an init image's settings do not carry over to txt2img
        for arg in ("strength", "image", "mask"):
            if getattr(args, arg) is None:
                merged[arg] = None
    if merged["engine_dir"] is None:
        raise ValueError(f"--from-png {args.from_png}: its {kind} metadata names no engine folder (model "
                         f"{settings.get('model', '?')}); give COMMAND and ENGINE_DIR before --from-png")
    print(f"settings from {args.from_png} ({kind} metadata)")
    if ignored:
        print(f"sd-generate: note: not applied from {args.from_png}: {'; '.join(ignored)}", file=sys.stderr)
    return argparse.Namespace(**merged)


def _infotext(params: dict[str, Any], seed: int, engine_dir: str, manifest: Any) -> str:
    """The A1111 `parameters` text of one image, with the engine folder's model identity."""
    karras = params["karras"]
    if karras is None:  # the engine's scheduler config decides (runtime/scheduler.py make_schedule)
        karras = params["scheduler"] == "dpmpp_2m_karras" or bool(manifest.scheduler.get("use_karras_sigmas"))
    source = manifest.source or {}
    name = Path(source["path"]).stem if source.get("path") else source.get("preset") or Path(engine_dir).name
    return png_info.infotext_from_parameters(params, seed=seed, karras=karras, model_hash=source.get("sha256"),
                                             model_name=name)


def _refiner(args: argparse.Namespace, pipe: Any, kwargs: dict[str, Any]) -> Any:
    """--refiner DIR opened with the same backend (None without it; `pipe` closed if it fails), and
    txt2img's refiner / refiner_switch_at put in `kwargs` (runtime/handover.py)."""
    if args.refiner is None:
        return None
    from runtime.pipeline import load

    try:
        refiner = load(args.refiner, backend=args.backend)
    except BaseException:
        pipe.close()
        raise
    kwargs.update(refiner=refiner, refiner_switch_at=args.refiner_switch_at)
    return refiner


def run(args: argparse.Namespace) -> int:
    from runtime.folder.manifest import load_manifest
    from runtime.pipeline import load

    if args.from_png:
        args = apply_png(args)
    if args.command is None or args.engine_dir is None or args.prompt is None:
        raise ValueError("COMMAND, ENGINE_DIR and PROMPT are required unless --from-png FILE gives them")
    if args.command == "txt2img" and (args.image or args.mask):
        raise ValueError("txt2img takes no --image or --mask; use img2img or inpaint")
    if args.command in ("img2img", "inpaint") and not args.image:
        raise ValueError(f"{args.command} needs --image")
    if args.command == "inpaint" and not args.mask:
        raise ValueError("inpaint needs --mask")
    if args.command == "img2img" and args.mask:
        raise ValueError("img2img takes no --mask; use inpaint")
    if args.command == "txt2img" and args.strength is not None:
        raise ValueError("--strength applies to img2img and inpaint only")
    if (args.refiner is not None or args.refiner_switch_at is not None) and (args.command != "txt2img" or
                                                                            args.refiner is None):
        raise ValueError("--refiner DIR (with --refiner-switch-at F) applies to txt2img")

    hires = hires_from_args(args)  # before load: a bad flag opens nothing
    pipe = load(args.engine_dir, backend=args.backend)
    kwargs: dict[str, Any] = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                                  scheduler=args.scheduler, karras=args.karras, seed=args.seed, output_type="pil",
                                  progress=not args.no_progress, vae_tiling=getattr(args, "vae_tiling", None))
    for arg, name in (("steps", "num_inference_steps"), ("guidance", "guidance_scale"), ("strength", "strength"),
                      ("guidance_rescale", "guidance_rescale"), ("eta", "eta"),
                      ("num_images", "num_images_per_prompt"), ("cache_interval", "cache_interval"),
                      ("cache_schedule", "cache_schedule"), ("prompt_syntax", "prompt_syntax"), ("tiling", "tiling"),
                      ("vae", "vae"), ("timestep_spacing", "timestep_spacing"),
                      ("prompt_2", "prompt_2"), ("negative_prompt_2", "negative_prompt_2")):
        if getattr(args, arg) is not None:  # otherwise the pipeline's default
            kwargs[name] = getattr(args, arg)
    kwargs.update(control_from_args(getattr(args, "control_image", [])))
    refiner = _refiner(args, pipe, kwargs)
    with pipe, (refiner or contextlib.nullcontext()):
        if args.command == "txt2img":
            result = pipe.txt2img(args.prompt, **kwargs, **({"hires": hires} if hires is not None else {}))
        elif args.command == "img2img":
            result = pipe.img2img(args.prompt, _open_image(args.image, "--image"), **kwargs)
        else:
            result = pipe.inpaint(args.prompt, _open_image(args.image, "--image"), _open_image(args.mask, "--mask"),
                                  **kwargs)

    paths = output_paths(args.output or f"{args.command}.png", len(result.images))
    manifest = load_manifest(args.engine_dir)
    for image, seed, path in zip(result.images, result.seeds, paths):
        meta = metadata_for(result.parameters, seed, args)
        save_png(image, path, meta, _infotext(meta, seed, args.engine_dir, manifest))
        p = result.parameters
        print(f"wrote {path} (seed {seed}, {p['width']}x{p['height']}, {p['scheduler']}, {p['steps']} steps, "
              f"backend {result.backend})")
    print("timings: " + ", ".join(f"{k} {v:.3f} s" for k, v in result.timings.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-") and Path(argv[0]).is_dir():
        argv.insert(0, "txt2img")  # `sd-generate ENGINE_DIR "prompt"`: txt2img with the folder's defaults
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

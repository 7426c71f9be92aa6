"""Render the fixed image set that guards refactors of the request path (tests/test_golden.py).

usage: python tests/golden/render.py ENGINES_DIR OUT.npz

ENGINES_DIR holds the engine folders `make_folders` builds (tiny-sd1 with the step cache, tiny-sd2,
tiny-inpaint, tiny-sd1 with a LoRA). The set covers every sampler, txt2img / img2img / both kinds
of inpainting, a batch of 3, step caching, a LoRA folder, A1111 weighting and a tiled decode, on
ONNX Runtime and OpenVINO (f32), as float32 arrays (`output_type="np"`), so two renders can be
compared bit for bit.

Only the public API (`runtime.load`, `txt2img` / `img2img` / `inpaint`, `request` + `generate`)
is used, so the same script renders with the code before and after a refactor: the test runs it
with an older checkout of `runtime/` on `sys.path` when the committed reference was made on another
machine (engines' float results depend on the CPU's kernels).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

STEPS = 4
SAMPLERS = ("ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc",
            "lcm")
BACKENDS = {"onnxruntime": {}, "openvino": {"inference_precision": "f32"}}
FOLDERS = ("tiny-sd1", "tiny-sd2", "tiny-inpaint", "tiny-sd1-lora")


def _picture(size: int, seed: int) -> np.ndarray:
    """A smooth float RGB picture in [0, 1] (a structured init image, not noise)."""
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    return np.stack([0.5 + 0.5 * np.sin(6 * x + 3 * y + p) for p in phase], axis=-1).astype(np.float32)


def _mask(size: int) -> np.ndarray:
    m = np.zeros((size, size), np.float32)
    m[size // 4: 3 * size // 4, size // 3: 5 * size // 6] = 1.0
    return m


def _cases(pipes: dict) -> dict[str, np.ndarray]:
    sd1, sd2, nine, lora = (pipes[f] for f in FOLDERS)
    common = dict(num_inference_steps=STEPS, output_type="np", progress=False)
    prompt, neg = "a red circle on a blue background", "blurry"
    out = {}
    for s in SAMPLERS:
        out[f"txt2img-{s}"] = sd1.txt2img(prompt, negative_prompt=neg, scheduler=s, seed=11, **common).images
    out["txt2img-euler-karras"] = sd1.txt2img(prompt, scheduler="euler", karras=True, seed=12, **common).images
    out["txt2img-ddim-eta"] = sd1.txt2img(prompt, scheduler="ddim", eta=0.5, seed=13, **common).images
    out["txt2img-rescale"] = sd1.txt2img(prompt, guidance_rescale=0.7, seed=14, **common).images
    out["txt2img-unguided"] = sd1.txt2img(prompt, guidance_scale=1.0, seed=15, **common).images
    out["txt2img-batch3"] = sd1.txt2img([prompt, "a green square", "stripes"], scheduler="euler_a", seed=16,
                                        **common).images
    reqs = [sd1.request("txt2img", p, seed=s, num_inference_steps=STEPS, scheduler="dpmpp_2m", output_type="np")
            for p, s in (("a cat", 1), ("a dog", 2), ("a fox", 3))]
    out["generate-3"] = np.concatenate([r.images for r in sd1.generate(reqs, progress=False)])
    out["txt2img-a1111"] = sd1.txt2img("a (red:1.4) circle, [blue] BREAK ((background))", seed=17, **common).images
    out["txt2img-long"] = sd1.txt2img(" ".join(["a red circle on a blue background"] * 14), seed=18,
                                      **common).images
    out["txt2img-cached"] = sd1.txt2img(prompt, scheduler="euler", cache_interval=2, seed=19,
                                        num_inference_steps=6, output_type="np", progress=False).images
    out["txt2img-tiled"] = sd1.txt2img(prompt, height=128, width=96, vae_tiling=48, seed=20, **common).images
    image, mask = _picture(64, 0), _mask(64)
    for s in ("euler", "ddim", "dpmpp_2m"):
        out[f"img2img-{s}"] = sd1.img2img(prompt, image=image, strength=0.6, scheduler=s, seed=21, **common).images
    out["img2img-tiled"] = sd1.img2img(prompt, image=_picture(128, 1), strength=0.5, vae_tiling=48, seed=22,
                                       **common).images
    out["inpaint-4ch"] = sd1.inpaint(prompt, image=image, mask_image=mask, seed=23, **common).images
    out["inpaint-4ch-strength"] = sd1.inpaint(prompt, image=image, mask_image=mask, strength=0.7,
                                              scheduler="euler_a", seed=24, **common).images
    out["inpaint-4ch-cached"] = sd1.inpaint(prompt, image=image, mask_image=mask, scheduler="euler",
                                            cache_interval=2, seed=25, num_inference_steps=6, output_type="np",
                                            progress=False).images
    out["inpaint-9ch"] = nine.inpaint(prompt, image=image, mask_image=mask, seed=26, **common).images
    out["inpaint-9ch-strength"] = nine.inpaint(prompt, image=image, mask_image=mask, strength=0.75,
                                               scheduler="unipc", seed=27, **common).images
    for s in ("euler", "ddim", "heun"):
        out[f"sd2-{s}"] = sd2.txt2img(prompt, negative_prompt=neg, scheduler=s, seed=28, **common).images
    out["sd2-img2img"] = sd2.img2img(prompt, image=image, strength=0.6, seed=29, **common).images
    out["lora-txt2img"] = lora.txt2img(prompt, seed=30, **common).images
    return out


def render(engines_dir: Path) -> dict[str, np.ndarray]:
    import runtime

    out = {}
    for backend, options in BACKENDS.items():
        pipes = {f: runtime.load(engines_dir / f, backend=backend, **options) for f in FOLDERS}
        try:
            out.update({f"{backend}/{k}": np.asarray(v, np.float32) for k, v in _cases(pipes).items()})
        finally:
            for p in pipes.values():
                p.close()
    return out


def make_lora(path: Path) -> Path:
    """A kohya-layout LoRA (rank 2) on tiny-sd1's U-Net attention projections and text encoder
    q/v projections, from a fixed seed."""
    from export.loading.read import random_model
    from safetensors.numpy import save_file

    model = random_model("tiny-sd1", seed=0)
    rng = np.random.default_rng(5)
    tensors = {}
    for prefix, net, suffixes in (("lora_unet_", model.unet, ("attn1.to_q", "attn2.to_v")),
                                  ("lora_te_", model.text_encoder, ("self_attn.q_proj", "self_attn.v_proj"))):
        for name, module in net.named_modules():
            if name.endswith(suffixes):
                out_f, in_f = module.weight.shape
                key = prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = rng.standard_normal((2, in_f)).astype(np.float32) * 0.3
                tensors[f"{key}.lora_up.weight"] = rng.standard_normal((out_f, 2)).astype(np.float32) * 0.3
                tensors[f"{key}.alpha"] = np.array(1.0, np.float32)
    save_file(tensors, str(path))
    return path


def make_folders(engines_dir: Path) -> Path:
    """Build the engine folders of the set (random presets, seed 0), reused when present."""
    from export.build import build_engine

    quiet = dict(seed=0, progress=lambda line: None)
    build_engine("tiny-sd1", engines_dir / "tiny-sd1", step_cache=True, **quiet)
    build_engine("tiny-sd2", engines_dir / "tiny-sd2", **quiet)
    build_engine("tiny-inpaint", engines_dir / "tiny-inpaint", **quiet)
    lora = make_lora(engines_dir / "style-lora.safetensors")
    build_engine("tiny-sd1", engines_dir / "tiny-sd1-lora", loras=[(lora, 0.8)], **quiet)
    return engines_dir


if __name__ == "__main__":
    images = render(Path(sys.argv[1]))
    np.savez_compressed(sys.argv[2], **images)
    print(f"{len(images)} arrays written to {sys.argv[2]}")

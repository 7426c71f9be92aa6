"""Train the embedded tiny demo model (export/assets/tiny/) on synthetic coloured shapes, on a CPU.

A 64x64 image shows one shape (circle, square, triangle) of one named colour on a background of
another; its caption states exactly those facts: "a red circle on a blue background". Images are
drawn on the fly from a NumPy generator seeded by --seed, so a run is reproducible when the step
counts, not the clocks (--vae-time-limit, --unet-time-limit), end both stages.

    Stage 1  the VAE (this project's export/vae.py AutoencoderKL) learns reconstruction with a small
             KL weight; its latent scaling factor is then set to 1 / std of the latents, as
             Rombach et al. 2022 (arXiv:2112.10752, sec. 4.3.2) chose 0.18215 for SD.
    Stage 2  the U-Net (export/unet.py) predicts the noise (eps) of latents noised with Stable
             Diffusion's scaled-linear schedule, jointly with a small CLIPTextModel over the real
             CLIP tokenizer. 10% of captions are replaced by "" so the empty prompt gives the
             unconditional embedding for classifier-free guidance (Ho & Salimans 2022,
             arXiv:2207.12598). The EMA of the weights is what gets saved.

At the end the model is saved as a diffusers folder (float16 safetensors) with
`export.loading.save.save_diffusers`, TRAINING.json records settings, losses and times, and a DDIM
sanity check (through the freshly saved folder) prints whether each prompt's colours came out.

    python tools/train_demo.py --threads 1          # the shipped model (docs/demo-model.md), ~27 min
    python tools/train_demo.py --vae-steps 30 --unet-steps 60 --pool 256 --out /tmp/tiny-smoke  # ~1 min
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from export.configs import ModelSpec, UNetConfig, VAEConfig, scheduler_config  # noqa: E402
from export.loading.read import LoadedModel, load_model  # noqa: E402
from export.loading.save import save_diffusers  # noqa: E402
from export.text_encoder import EOS_TOKEN, build_text_encoder, write_tokenizer_files  # noqa: E402
from export.unet import UNet2DConditionModel  # noqa: E402
from export.vae import AutoencoderKL  # noqa: E402

# Named colours, far apart in RGB so the nearest-colour check is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 64
COLOUR_JITTER = 12  # +- per channel, uniform

# Stable Diffusion's noise schedule: CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml
# `linear_start: 0.00085`, `linear_end: 0.0120`, `timesteps: 1000`, beta_schedule "scaled_linear"
# (betas = linspace(sqrt(start), sqrt(end), T) ** 2).
BETA_START, BETA_END, TRAIN_TIMESTEPS = 0.00085, 0.012, 1000

TEXT_ENCODER = {  # transformers CLIPTextConfig keyword arguments; ids from export/assets/clip-bpe
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
UNET = UNetConfig(
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=2,  # diffusers' name for the number of heads
    cross_attention_dim=TEXT_ENCODER["hidden_size"],
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
)
VAE = VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE,
                scaling_factor=1.0)  # the real factor is measured after stage 1


def ddim_scheduler_config() -> dict:
    """SD's scheduler config (export.configs.scheduler_config: scaled-linear betas, steps_offset 1,
    set_alpha_to_one false, clip_sample false) as a DDIMScheduler, the default sampler of the folder.
    PNDM's 4th-order multistep needs about 50 steps with this model: at 20 steps and guidance 5 it
    got both colours right in 9 of the 24 test images, where DDIM, Euler, DPM++ 2M all got 24."""
    config = {k: v for k, v in scheduler_config("epsilon").items() if k not in ("_class_name", "skip_prk_steps")}
    return {"_class_name": "DDIMScheduler", **config}


# ------------------------------------------------------------------------------------------- data


def caption(shape: str, fg: str, bg: str) -> str:
    return f"a {fg} {shape} on a {bg} background"


def draw(shape: str, fg: str, bg: str, rng: np.random.Generator) -> np.ndarray:
    """One image, uint8 [64, 64, 3]: `shape` in colour `fg`, centre and size jittered, on `bg`."""
    s = IMAGE_SIZE
    cx, cy = rng.uniform(s / 2 - 6, s / 2 + 6, size=2)
    r = rng.uniform(11, 17)
    y, x = np.mgrid[0:s, 0:s] + 0.5
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        half = 0.85 * r  # about the circle's area
        mask = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # triangle, apex up: rows from cy - r to cy + 0.8 r widen to a half base of 1.1 r
        top, bottom = cy - r, cy + 0.8 * r
        frac = (y - top) / (bottom - top)
        mask = (frac >= 0) & (frac <= 1) & (np.abs(x - cx) <= 1.1 * r * frac)
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=(2, 3))
    img = np.empty((s, s, 3), np.int32)
    img[:] = np.asarray(COLOURS[bg]) + jitter[0]
    img[mask] = np.asarray(COLOURS[fg]) + jitter[1]
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    """n random (shape, fg != bg) images as float [n, 3, 64, 64] in [-1, 1], and their captions."""
    names = list(COLOURS)
    images, captions = [], []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        fg, bg = rng.choice(len(names), size=2, replace=False)
        images.append(draw(shape, names[fg], names[bg], rng))
        captions.append(caption(shape, names[fg], names[bg]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [n, h, w, 3] -> [n, 3, h, w]
    return x, captions


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, h, w] in [-1, 1] -> uint8 [h, w, 3]."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    d = ((np.asarray([COLOURS[n] for n in names], np.float64) - rgb) ** 2).sum(axis=1)
    return names[int(d.argmin())]


def measure_colours(image: np.ndarray) -> tuple[str, str]:
    """(shape colour, background colour) of a uint8 [h, w, 3] image: the background is the median of
    a 4-pixel border; the shape the median of the pixels far (> 80 in RGB) from it, else the centre."""
    h, w, _ = image.shape
    px = image.astype(np.float64)
    border = np.concatenate([px[:4].reshape(-1, 3), px[-4:].reshape(-1, 3), px[:, :4].reshape(-1, 3),
                             px[:, -4:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    far = np.sqrt(((px - bg) ** 2).sum(axis=-1)) > 80
    centre = px[h // 4: 3 * h // 4, w // 4: 3 * w // 4].reshape(-1, 3)
    fg = np.median(px[far], axis=0) if far.sum() >= 20 else np.median(centre, axis=0)
    return nearest_colour(fg), nearest_colour(bg)


# ------------------------------------------------------------------------------------------ model


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP ids [n, 77], padded with the pad token and truncated as the runtime does."""
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    return torch.from_numpy(ids.astype(np.int64))


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def lr_at(progress: float, base: float, warmup: float = 0.03) -> float:
    """Linear warm-up, then cosine decay to 10% of `base`; progress in [0, 1]."""
    if progress < warmup:
        return base * progress / warmup
    p = (progress - warmup) / (1 - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


class Progress:
    """Stage progress: the larger of steps done / steps and elapsed / time limit."""

    def __init__(self, steps: int, limit_s: float):
        self.steps, self.limit_s, self.t0 = steps, limit_s, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, step: int) -> float:
        return max(step / self.steps, self.elapsed() / self.limit_s)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_vae(vae: AutoencoderKL, args, rng: np.random.Generator) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    prog = Progress(args.vae_steps, args.vae_time_limit * 60)
    rec_hist, kl_hist, step = [], [], 0
    while prog(step) < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr_at(prog(step), args.vae_lr)
        x, _ = sample_batch(rng, args.vae_batch)
        mean, std = vae.encode(x)
        z = mean + std * torch.randn_like(std)
        rec = F.mse_loss(vae.decode(z), x)
        # KL(N(mean, std) || N(0, 1)), summed over latent elements, averaged over the batch
        kl = 0.5 * (mean ** 2 + std ** 2 - 1.0 - 2.0 * torch.log(std)).sum(dim=(1, 2, 3)).mean()
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        rec_hist.append(rec.item())
        kl_hist.append(kl.item())
        step += 1
        if step % args.log_every == 0:
            log(f"vae step {step}/{args.vae_steps}  rec {np.mean(rec_hist[-args.log_every:]):.5f}  "
                f"kl {np.mean(kl_hist[-args.log_every:]):.1f}  {prog.elapsed() / step:.2f} s/step")
    vae.eval()
    tail = max(1, min(50, len(rec_hist)))
    return {"steps": step, "wall_s": round(prog.elapsed(), 1), "final_rec_mse": float(np.mean(rec_hist[-tail:])),
            "final_kl": float(np.mean(kl_hist[-tail:]))}


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, tokenizer, n: int, rng: np.random.Generator):
    """n fresh images: latent posterior (mean, std), unscaled, with token ids and pixel data."""
    means, stds, ids = [], [], []
    check: dict[str, float] = {}
    for i in range(0, n, 64):
        x, caps = sample_batch(rng, min(64, n - i))
        mean, std = vae.encode(x)
        means.append(mean)
        stds.append(std)
        ids.append(tokenize(tokenizer, caps))
        if i == 0:  # held-out reconstruction of the first 64 images, and whether it keeps both colours
            rec = vae.decode(mean)
            same = [measure_colours(to_uint8(a)) == measure_colours(to_uint8(b)) for a, b in zip(rec, x)]
            check = {"heldout_rec_mse": F.mse_loss(rec, x).item(), "heldout_colour_accuracy": float(np.mean(same))}
    return torch.cat(means), torch.cat(stds), torch.cat(ids), check


def train_unet(unet, text_encoder, pool, scaling_factor: float, empty_ids: torch.Tensor, args,
               rng: np.random.Generator):
    means, stds, ids = pool
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train()
    text_encoder.train()
    ac = alphas_cumprod().float()
    prog = Progress(args.unet_steps, args.unet_time_limit * 60)
    hist, step = [], 0
    while prog(step) < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr_at(prog(step), args.unet_lr)
        idx = torch.from_numpy(rng.integers(0, len(means), size=args.unet_batch))
        z0 = (means[idx] + stds[idx] * torch.randn_like(stds[idx])) * scaling_factor
        tok = ids[idx].clone()
        drop = torch.from_numpy(rng.random(args.unet_batch) < args.caption_dropout)
        tok[drop] = empty_ids
        t = torch.randint(0, TRAIN_TIMESTEPS, (args.unet_batch,))
        # offset noise (a per-channel constant, Guttenberg 2023 "Diffusion with Offset Noise"): the
        # scaled-linear schedule leaves sqrt(alpha_bar_999) = 0.068 of the signal, so without it
        # the model reads flat colours off the noise mean and ignores the prompt for them
        noise = torch.randn_like(z0) + args.offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1)
        a = ac[t][:, None, None, None]
        xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        context = text_encoder(input_ids=tok).last_hidden_state  # [b, 77, hidden]
        loss = F.mse_loss(unet(xt, t, context), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        hist.append(loss.item())
        if step % args.log_every == 0:
            p = prog(step)
            eta = prog.elapsed() * (1 - p) / max(p, 1e-9)
            log(f"unet step {step}/{args.unet_steps}  loss {np.mean(hist[-args.log_every:]):.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {prog.elapsed() / step:.2f} s/step  eta {eta / 60:.1f} min")
    tail = max(1, min(200, len(hist)))
    stats = {"steps": step, "wall_s": round(prog.elapsed(), 1), "final_loss": float(np.mean(hist[-tail:])),
             "loss_first_100": float(np.mean(hist[:100]))}
    return ema_unet, ema_text, stats


# --------------------------------------------------------------------------------------- sampling

SANITY_PROMPTS = [  # every shape, every colour as both shape and background
    ("circle", "red", "blue"), ("square", "green", "yellow"), ("triangle", "blue", "white"),
    ("circle", "yellow", "black"), ("square", "white", "red"), ("triangle", "black", "green"),
    ("circle", "green", "white"), ("square", "blue", "black"), ("triangle", "red", "yellow"),
    ("circle", "white", "green"), ("square", "black", "blue"), ("triangle", "yellow", "red"),
]


@torch.no_grad()
def ddim_sample(model: LoadedModel, tokenizer, prompts: list[str], seed: int, steps: int = 20,
                guidance: float = 5.0) -> np.ndarray:
    """DDIM (eta 0, Song et al. 2021 eq. 12) with SD's "leading" spacing and steps_offset 1, with
    classifier-free guidance; returns uint8 [n, 64, 64, 3]."""
    ac = alphas_cumprod()
    n, f = len(prompts), model.spec.vae_scale_factor
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.spec.vae.latent_channels, IMAGE_SIZE // f, IMAGE_SIZE // f, generator=gen,
                    dtype=torch.float64)
    cond = model.text_encoder(input_ids=tokenize(tokenizer, prompts)).last_hidden_state
    uncond = model.text_encoder(input_ids=tokenize(tokenizer, [""] * n)).last_hidden_state
    context = torch.cat([uncond, cond])
    ts = (np.arange(steps) * (TRAIN_TIMESTEPS // steps) + 1)[::-1]
    for i, t in enumerate(ts):
        eps_u, eps_c = model.unet(torch.cat([x, x]).float(), torch.full((2 * n,), float(t)), context).double().chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]  # set_alpha_to_one False
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return np.stack([to_uint8(img) for img in model.vae.decode((x / model.spec.vae.scaling_factor).float())])


def sanity_check(model: LoadedModel, tokenizer, label: str, guidance: float) -> float:
    prompts = [caption(*p) for p in SANITY_PROMPTS]
    hits = 0
    for seed in (0, 1):
        images = ddim_sample(model, tokenizer, prompts, seed=seed, guidance=guidance)
        for (shape, fg, bg), img in zip(SANITY_PROMPTS, images):
            got_fg, got_bg = measure_colours(img)
            ok = (got_fg, got_bg) == (fg, bg)
            hits += ok
            log(f"  [{label}] seed {seed} {caption(shape, fg, bg)!r}: shape {got_fg}, background {got_bg}"
                f"  {'ok' if ok else 'MISS'}")
    acc = hits / (2 * len(prompts))
    log(f"sanity [{label}]: {hits}/{2 * len(prompts)} images with both colours right ({acc:.0%})")
    return acc


# ------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "export" / "assets" / "tiny", help="diffusers folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="torch intra-op threads (1 is faster on a CPU busy with other work)")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-time-limit", type=float, default=8.0,
                   help="minutes; stage 1 stops at whichever comes first")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--pool", type=int, default=4096, help="images encoded once for stage 2")
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--unet-time-limit", type=float, default=22.0,
                   help="minutes; stage 2 stops at whichever comes first")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--offset-noise", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--guidance", type=float, default=5.0, help="for the sanity check")
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    from transformers import CLIPTokenizer

    tokenizer_dir = write_tokenizer_files(tempfile.mkdtemp(prefix="train-demo-tokenizer-"), EOS_TOKEN)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    trained, stats = train(args, rng, tokenizer, tokenizer_dir)
    train_wall = time.perf_counter() - t_start
    acc_fp32 = sanity_check(trained, tokenizer, "fp32, in memory", args.guidance)

    out = args.out.resolve()
    staging, acc_fp16 = save_staged(trained, tokenizer, out, args.guidance)
    accuracy = {"fp32": acc_fp32, "fp16": acc_fp16, "images": 2 * len(SANITY_PROMPTS),
                "sampler": "DDIM 20 steps", "guidance": args.guidance}
    record = training_record(args, argv, trained.spec, stats, accuracy,
                             {"training": round(train_wall, 1), "total": round(time.perf_counter() - t_start, 1)})
    publish(staging, out, record)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"saved {out} ({size / 2**20:.1f} MiB); total {record['wall_time_s']['total'] / 60:.1f} min")
    return 0


def train(args, rng: np.random.Generator, tokenizer, tokenizer_dir: Path) -> tuple[LoadedModel, dict]:
    """Stage 1 (the VAE), the latent pool and its scaling factor, stage 2 (U-Net and text encoder).
    Returns the EMA model, ready to save, and {"parameters", "vae", "unet"} statistics."""
    empty_ids = tokenize(tokenizer, [""])[0]
    vae = AutoencoderKL(VAE)
    unet = UNet2DConditionModel(UNET)
    text_encoder = build_text_encoder(TEXT_ENCODER)
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in
             (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    log(f"parameters: {sizes}; threads {torch.get_num_threads()}")

    log("stage 1: VAE")
    vae_stats = train_vae(vae, args, rng)
    log(f"encoding a pool of {args.pool} images")
    means, stds, ids, check = encode_pool(vae, tokenizer, args.pool, rng)
    scaling_factor = float(1.0 / means.std())
    vae_stats.update(check, scaling_factor=scaling_factor, latent_std_mean=float(stds.mean()))
    log(f"VAE: {vae_stats}")

    log("stage 2: U-Net + text encoder")
    ema_unet, ema_text, unet_stats = train_unet(unet, text_encoder, (means, stds, ids), scaling_factor,
                                                empty_ids, args, rng)
    log(f"U-Net: {unet_stats}")

    spec = ModelSpec("sd1", UNET, replace(VAE, scaling_factor=round(scaling_factor, 5)),
                     dict(TEXT_ENCODER), ddim_scheduler_config(), pad_token=EOS_TOKEN)
    ema_unet.requires_grad_(False)
    ema_text.requires_grad_(False)
    vae.requires_grad_(False)
    trained = LoadedModel(spec, ema_unet, vae, ema_text, tokenizer_dir,
                          {"kind": "trained", "path": None, "sha256": None})
    return trained, {"parameters": sizes, "vae": vae_stats, "unet": unet_stats}


def save_staged(trained: LoadedModel, tokenizer, out: Path, guidance: float) -> tuple[Path, float]:
    """Save `trained` (float16) into a staging folder beside `out`, and sanity-check it read back from
    there: (the staging folder, its accuracy). The folder is removed if either fails; `publish` swaps
    it in, so a reader never sees a half-written model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_diffusers(trained, staging, fp16=True)
        acc_fp16 = sanity_check(load_model(staging), tokenizer, "fp16, saved folder", guidance)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, acc_fp16


def training_record(args, argv, spec: ModelSpec, stats: dict, accuracy: dict, wall_time_s: dict) -> dict:
    """TRAINING.json: the command and settings, data and configs, training statistics, sanity accuracy,
    wall times and versions."""
    return {
        "command": "python tools/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seed": args.seed,
        "data": {"image_size": IMAGE_SIZE, "shapes": list(SHAPES), "colours": COLOURS,
                 "caption": caption("{shape}", "{colour}", "{background}")},
        "configs": {"unet": UNET.to_dict(), "vae": spec.vae.to_dict(), "text_encoder": TEXT_ENCODER},
        **stats,
        "sanity_accuracy": accuracy,
        "wall_time_s": wall_time_s,
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "numpy": np.__version__},
    }


def publish(staging: Path, out: Path, record: dict) -> None:
    """Write TRAINING.json into `staging`, make its files world-readable, and swap it in for `out`."""
    (staging / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for path in [staging, *staging.rglob("*")]:  # mkdtemp and safetensors create owner-only files
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        old = out.with_name(f".{out.name}-old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


if __name__ == "__main__":
    sys.exit(main())

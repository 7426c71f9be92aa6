"""LoRA fused at build time (export/lora.py, `build-engine --lora FILE[:SCALE]`).

The LoRAs are made here with PEFT on the tiny SD 1.x and 2.x models (random non-zero lora_B, since
PEFT starts B at zero, a no-op), saved in diffusers' layout by diffusers' own `save_lora_weights`,
and the same weights written in the kohya layout by this file's own code. References:
- weights: diffusers' `load_lora_weights` + `fuse_lora(lora_scale=...)` (one or two adapters, via
  `set_adapters`), and PEFT's own `merge_and_unload` of the layers that made the file;
- images: our engine folder, run by ONNX Runtime, against diffusers' pipeline with the fused LoRA,
  same latents, PSNR over float images in [0, 1]; >= 60 dB is the requirement, and fp32 parity here
  must also reach PARITY_PSNR_DB = 90 dB (tests/psnr_bounds.py says why), while the LoRA
  itself must move the image well below that (else the comparison would not tell).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import runtime
from export.build import build_engine
from export.cli import main
from export.loading.read import CheckpointError, random_model
from export.loading.save import save_diffusers
from export.lora import LoraError, LoraSpec, apply_loras, parse_lora, read_lora
from psnr_bounds import PARITY_PSNR_DB
from runtime.compare import psnr
from runtime.folder.manifest import load_manifest

log = logging.getLogger(__name__)

LORA_MOVES_DB = 60.0  # an image with the LoRA vs without must differ more than this
STEPS = 3
PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry"
SMALL = {"min_image": 32, "opt_image": 64, "max_image": 64, "max_batch": 2}
UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")


# --------------------------------------------------------------------------------- making LoRAs


def peft_layers(network: torch.nn.Module, config, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """PEFT LoRA layers injected into a copy of `network`, lora_B drawn at random; (the PEFT
    model, its adapter state dict)."""
    model = peft.inject_adapter_in_model(config, copy.deepcopy(network))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model, peft.get_peft_model_state_dict(model)


def save_diffusers_lora(path: Path, unet_sd, text_sd, unet_config=None, text_config=None) -> Path:
    """diffusers' own writer; with configs, their LoraConfig goes into the header (alpha != rank)."""
    diffusers.StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd, weight_name=path.name,
        unet_lora_adapter_metadata=unet_config.to_dict() if unet_config else None,
        text_encoder_lora_adapter_metadata=text_config.to_dict() if text_config else None)
    return path


def save_kohya_lora(path: Path, unet_sd, text_sd, alpha) -> Path:
    """The same weights in kohya-ss' layout: lora_unet_/lora_te_text_model_ + the module's dotted name
    with "_" for ".", lora_down/lora_up, and `alpha(component, module)` per module."""
    tensors = {}
    for prefix, component, sd in (("lora_unet_", "unet", unet_sd), ("lora_te_text_model_", "text_encoder", text_sd)):
        for key, value in sd.items():
            module, _, rest = key.partition(".lora_")
            name = prefix + module.replace(".", "_")
            tensors[f"{name}.{'lora_down' if rest.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha(component, module)))
    safetensors.torch.save_file(tensors, str(path))
    return path


def merged_by_peft(peft_model: torch.nn.Module, scale: float) -> dict[str, torch.Tensor]:
    """PEFT's own merge of its LoRA layers at `scale` (an independent reference)."""
    model = copy.deepcopy(peft_model)
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.scale_layer(scale)
            module.merge()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


class Family:
    """A tiny model saved as a diffusers folder, and LoRA files made on it."""

    def __init__(self, root: Path, preset: str):
        self.preset, self.root = preset, root
        self.model = random_model(preset, seed=0)
        self.folder = save_diffusers(self.model, root / "diffusers")

    def pipe(self):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            str(self.folder), safety_checker=None, requires_safety_checker=False, feature_extractor=None,
            local_files_only=True, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        base = json.loads((self.folder / "scheduler" / "scheduler_config.json").read_text())
        pipe.scheduler = diffusers.DDIMScheduler.from_config(base)
        return pipe


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """tiny-sd1 and two LoRAs: "a" on the U-Net's attention projections, proj_in/out (1x1 convs) and
    the resnets' 3x3 conv1 (LoCon, rank 2 and its own alpha), and the text encoder's q/k/v/out and
    fc1; alpha != rank, written both with metadata (diffusers layout) and as kohya .alpha keys. "b":
    attention projections only, no metadata (alpha = rank)."""
    fam = Family(tmp_path_factory.mktemp("lora-sd1"), "tiny-sd1")
    unet_cfg = peft.LoraConfig(r=4, lora_alpha=2, target_modules=UNET_ATTN + ["proj_in", "proj_out", "conv1"],
                               rank_pattern={"conv1": 2}, alpha_pattern={"conv1": 1.0}, init_lora_weights="gaussian")
    text_cfg = peft.LoraConfig(r=2, lora_alpha=1, target_modules=TEXT_ATTN + ["fc1"], init_lora_weights="gaussian")
    fam.a_unet, a_unet_sd = peft_layers(fam.model.unet, unet_cfg, seed=1)
    fam.a_text, a_text_sd = peft_layers(fam.model.text_encoder, text_cfg, seed=2)
    fam.a_peft = save_diffusers_lora(fam.root / "a.safetensors", a_unet_sd, a_text_sd, unet_cfg, text_cfg)
    fam.a_kohya = save_kohya_lora(fam.root / "a-kohya.safetensors", a_unet_sd, a_text_sd,
                                  lambda c, m: 1.0 if m.endswith("conv1") else (2 if c == "unet" else 1))
    b_unet = peft.LoraConfig(r=2, lora_alpha=2, target_modules=UNET_ATTN, init_lora_weights="gaussian")
    b_text = peft.LoraConfig(r=3, lora_alpha=3, target_modules=TEXT_ATTN, init_lora_weights="gaussian")
    fam.b_unet, b_unet_sd = peft_layers(fam.model.unet, b_unet, seed=3)
    fam.b_text, b_text_sd = peft_layers(fam.model.text_encoder, b_text, seed=4)
    fam.b = save_diffusers_lora(fam.root / "b.safetensors", b_unet_sd, b_text_sd)
    return fam


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """tiny-sd2 (linear proj_in/out, v-prediction, "!" padding) and a LoRA on its attention
    projections, proj_in/out (Linear here) and the feed-forward, rank 4, alpha 8, in both layouts."""
    fam = Family(tmp_path_factory.mktemp("lora-sd2"), "tiny-sd2")
    unet_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=UNET_ATTN + ["proj_in", "proj_out", "ff.net.2"],
                               init_lora_weights="gaussian")
    text_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_ATTN, init_lora_weights="gaussian")
    fam.x_unet, unet_sd = peft_layers(fam.model.unet, unet_cfg, seed=5)
    fam.x_text, text_sd = peft_layers(fam.model.text_encoder, text_cfg, seed=6)
    fam.x_peft = save_diffusers_lora(fam.root / "x.safetensors", unet_sd, text_sd, unet_cfg, text_cfg)
    fam.x_kohya = save_kohya_lora(fam.root / "x-kohya.safetensors", unet_sd, text_sd, lambda c, m: 8)
    return fam


# ------------------------------------------------------------------------------ weight-level parity


def _fused_reference(fam: Family, loras: list[tuple[Path, float]]):
    """diffusers' fused U-Net and text encoder state dicts for `loras` [(file, scale)]."""
    pipe = fam.pipe()
    names = [f"l{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if len(loras) == 1:
        pipe.fuse_lora(lora_scale=loras[0][1])
    else:
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
        pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe.unet.state_dict(), pipe.text_encoder.state_dict(), pipe


def _max_diff(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert set(ours) == set(ref)
    return max(float((ours[k] - ref[k]).abs().max()) for k in ref)


def _merged(fam: Family, loras: list[tuple[Path, float]]):
    model = random_model(fam.preset, seed=0)
    apply_loras(model, [LoraSpec(p, s) for p, s in loras])
    return model


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_sd1_merged_weights_match_diffusers_and_peft(sd1, layout):
    path = sd1.a_peft if layout == "diffusers" else sd1.a_kohya
    model = _merged(sd1, [(path, 0.8)])
    ref_unet, ref_text, _ = _fused_reference(sd1, [(path, 0.8)])
    assert _max_diff(model.unet.state_dict(), ref_unet) < 1e-6
    assert _max_diff(model.text_encoder.state_dict(), ref_text) < 1e-6
    assert _max_diff(model.unet.state_dict(), merged_by_peft(sd1.a_unet, 0.8)) < 1e-6
    assert _max_diff(model.text_encoder.state_dict(), merged_by_peft(sd1.a_text, 0.8)) < 1e-6
    # and the LoRA did change them: the 3x3 LoCon conv, a 1x1 conv and the text encoder's fc1
    base = sd1.model
    for part, key in (("unet", "down_blocks.0.resnets.0.conv1.weight"),
                      ("unet", "mid_block.attentions.0.proj_in.weight"),
                      ("text_encoder", "encoder.layers.1.mlp.fc1.weight")):
        after, before = getattr(model, part).state_dict()[key], getattr(base, part).state_dict()[key]
        assert float((after - before).abs().max()) > 1e-2, key


def test_two_loras_and_alpha_equal_rank_match_diffusers(sd1):
    loras = [(sd1.a_kohya, 0.8), (sd1.b, 0.5)]
    model = _merged(sd1, loras)
    ref_unet, ref_text, _ = _fused_reference(sd1, loras)
    assert _max_diff(model.unet.state_dict(), ref_unet) < 1e-6
    assert _max_diff(model.text_encoder.state_dict(), ref_text) < 1e-6


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_sd2_merged_weights_match_diffusers_and_peft(sd2, layout):
    path = sd2.x_peft if layout == "diffusers" else sd2.x_kohya
    model = _merged(sd2, [(path, 0.8)])
    ref_unet, ref_text, _ = _fused_reference(sd2, [(path, 0.8)])
    assert _max_diff(model.unet.state_dict(), ref_unet) < 1e-6
    assert _max_diff(model.text_encoder.state_dict(), ref_text) < 1e-6
    assert _max_diff(model.unet.state_dict(), merged_by_peft(sd2.x_unet, 0.8)) < 1e-6


def test_kohya_names_resolve_against_the_model_and_alpha_is_per_module(sd1):
    """Hand-computed reference for two modules: W + s * (alpha / rank) * up @ down."""
    tensors, metadata = read_lora(sd1.a_kohya)
    layout, layers = parse_lora(tensors, metadata, {"unet": sd1.model.unet, "text_encoder": sd1.model.text_encoder})
    assert layout == "kohya" and metadata == {}
    by_name = {(layer.component, layer.module): layer for layer in layers}
    # "to_out_0" and "transformer_blocks" hold underscores of their own; only the model's names tell
    attn = ("unet", "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0")
    conv = ("unet", "up_blocks.1.resnets.1.conv1")
    assert attn in by_name and conv in by_name and ("text_encoder", "encoder.layers.2.self_attn.out_proj") in by_name
    model = _merged(sd1, [(sd1.a_kohya, 0.7)])
    for (component, module), alpha, rank in ((attn, 2.0, 4), (conv, 1.0, 2)):
        stem = "lora_unet_" + module.replace(".", "_")
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        assert down.shape[0] == rank
        w0 = sd1.model.unet.get_submodule(module).weight
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
        want = w0 + 0.7 * (alpha / rank) * delta
        torch.testing.assert_close(model.unet.get_submodule(module).weight, want, rtol=0, atol=1e-6)


def _old_diffusers_key(key: str) -> str:
    """diffusers' spellings before PEFT: attention processors' to_q_lora (the text encoder's
    q_proj too) and lora_linear_layer, with the text encoder under text_model."""
    component, _, rest = key.partition(".")
    module, _, half = rest.rpartition(".lora_")
    half = "down" if half.startswith("A") else "up"
    parent, _, leaf = module.rpartition(".")
    if component == "text_encoder":
        proc = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
        tail = f"{parent}.{proc[leaf]}" if leaf in proc else f"{module}.lora_linear_layer"
        return f"text_encoder.text_model.{tail}.{half}.weight"
    if module.endswith("to_out.0"):
        return f"unet.{module.removesuffix('.to_out.0')}.processor.to_out_lora.{half}.weight"
    return f"unet.{parent}.processor.{leaf}_lora.{half}.weight"


def test_other_spellings_parse_to_the_same_layers(sd1):
    """Older diffusers keys (to_q_lora, lora_linear_layer) and kohya's lora_te1_ prefix."""
    networks = {"unet": sd1.model.unet, "text_encoder": sd1.model.text_encoder}
    tensors, metadata = read_lora(sd1.b)
    _, want = parse_lora(tensors, metadata, networks)
    old = {_old_diffusers_key(k): v for k, v in tensors.items()}
    assert any(".processor.to_out_lora." in k for k in old) and any("self_attn.to_q_lora" in k for k in old)
    layout, got = parse_lora(old, {}, networks)
    # U-Net: 4 transformer blocks x 2 attentions x q/k/v/out; text encoder: 3 layers x q/k/v/out
    assert layout == "diffusers" and len(got) == len(want) == 4 * 2 * 4 + 3 * 4
    for a, b in zip(got, want):
        assert (a.component, a.module, a.factor) == (b.component, b.module, b.factor)
        assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up)
    kohya, _ = read_lora(sd1.a_kohya)
    te1 = {k.replace("lora_te_", "lora_te1_"): v for k, v in kohya.items()}
    assert [(x.module, x.factor) for x in parse_lora(te1, {}, networks)[1]] == \
        [(x.module, x.factor) for x in parse_lora(kohya, {}, networks)[1]]


# ----------------------------------------------------------------------------- image-level parity


def _latents(engine_dir: Path, seed: int = 11) -> np.ndarray:
    """Initial noise at the folder's default size, for both pipelines."""
    manifest = load_manifest(engine_dir)
    (h, w), f = manifest.default_size, manifest.dims.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((1, 4, h // f, w // f), dtype=np.float32)


def _images_ours(engine_dir: Path, latents: np.ndarray) -> np.ndarray:
    pipe = runtime.load(engine_dir, backend="onnxruntime")
    return pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, latents=latents, num_inference_steps=STEPS,
                        guidance_scale=7.5, scheduler="ddim", output_type="np", progress=False).images


def _images_diffusers(pipe, latents: np.ndarray) -> np.ndarray:
    h, w = (n * pipe.vae_scale_factor for n in latents.shape[2:])
    return pipe(PROMPT, negative_prompt=NEGATIVE, latents=torch.from_numpy(latents), num_inference_steps=STEPS,
                guidance_scale=7.5, output_type="np", height=h, width=w).images


def _check_images(fam: Family, engine_dir: Path, loras: list[tuple[Path, float]], what: str) -> None:
    latents = _latents(engine_dir)
    ours = _images_ours(engine_dir, latents)
    ref = _images_diffusers(_fused_reference(fam, loras)[2], latents)
    without = _images_diffusers(fam.pipe(), latents)
    value, moved = psnr(ours, ref), psnr(ref, without)
    log.info("PSNR %s vs diffusers: %.1f dB (the LoRA itself moves the image to %.1f dB)", what, value, moved)
    assert value >= PARITY_PSNR_DB, f"{what}: PSNR {value:.1f} dB"
    assert moved < LORA_MOVES_DB, f"{what}: the LoRA barely changes the image ({moved:.1f} dB): the test cannot tell"


@pytest.fixture(scope="module")
def sd1_engine(sd1):
    """Engine folder of the SD 1.x diffusers folder with `--lora a.safetensors:0.8` (diffusers layout)."""
    return build_engine(str(sd1.folder), sd1.root / "engine-a", loras=[f"{sd1.a_peft}:0.8"],
                        progress=lambda line: None, **SMALL)


def test_sd1_engine_matches_diffusers_fuse_lora(sd1, sd1_engine):
    _check_images(sd1, sd1_engine, [(sd1.a_peft, 0.8)], "tiny-sd1, diffusers-layout LoRA at 0.8")


def test_sd1_two_loras_kohya_and_diffusers_layout_match_diffusers(sd1):
    engine = build_engine(str(sd1.folder), sd1.root / "engine-two", loras=[(sd1.a_kohya, 0.8), f"{sd1.b}:0.5"],
                          progress=lambda line: None, **SMALL)
    _check_images(sd1, engine, [(sd1.a_kohya, 0.8), (sd1.b, 0.5)], "tiny-sd1, kohya LoRA 0.8 + diffusers LoRA 0.5")


def test_sd2_engine_matches_diffusers_fuse_lora(sd2):
    engine = build_engine(str(sd2.folder), sd2.root / "engine", loras=[f"{sd2.x_peft}:0.8"],
                          progress=lambda line: None, **SMALL)
    _check_images(sd2, engine, [(sd2.x_peft, 0.8)], "tiny-sd2, diffusers-layout LoRA at 0.8")


# --------------------------------------------------------------------------- manifest and reuse key


def test_manifest_records_each_lora(sd1, sd1_engine):
    manifest = load_manifest(sd1_engine)
    assert manifest.source["loras"] == [{"file": "a.safetensors", "path": str(sd1.a_peft.resolve()),
                                         "sha256": hashlib.sha256(sd1.a_peft.read_bytes()).hexdigest(),
                                         "scale": 0.8}]
    assert "embeddings" not in manifest.source and "embeddings" not in manifest.tokenizer
    # what the PyTorch reference engine needs to rebuild the folder's model from its manifest
    from export.adapters import apply_recorded

    rebuilt = apply_recorded(random_model("tiny-sd1", seed=0), manifest.source)
    want = _merged(sd1, [(sd1.a_peft, 0.8)])
    assert _max_diff(rebuilt.unet.state_dict(), want.unet.state_dict()) == 0.0
    assert _max_diff(rebuilt.text_encoder.state_dict(), want.text_encoder.state_dict()) == 0.0
    gone = {**manifest.source, "loras": [{**manifest.source["loras"][0], "sha256": "0" * 64}]}
    with pytest.raises(CheckpointError, match="is gone or changed since the engine folder was built"):
        apply_recorded(random_model("tiny-sd1", seed=0), gone)


class _Rebuild(Exception):
    pass


def test_changed_scale_or_file_rebuilds_and_same_arguments_reuse(sd1, sd1_engine, monkeypatch, tmp_path):
    import export.build

    def no_build(*args, **kwargs):
        raise _Rebuild

    monkeypatch.setattr(export.build, "_build_into", no_build)
    lines: list[str] = []

    def build(loras, out=sd1_engine):
        lines.clear()
        return build_engine(str(sd1.folder), out, loras=loras, progress=lines.append, **SMALL)

    assert build([(sd1.a_peft, 0.8)]) == sd1_engine and any(line.startswith("up to date") for line in lines)
    moved = shutil.copy2(sd1.a_peft, tmp_path / "a.safetensors")  # same bytes, same name, elsewhere
    build([f"{moved}:0.8"])
    assert any(line.startswith("up to date") for line in lines)
    for loras, why in (([(sd1.a_peft, 0.7)], "scale"), ([], "no LoRA"), ([(sd1.a_peft, 0.8), (sd1.b, 1.0)], "two")):
        with pytest.raises(_Rebuild):
            build(loras)
        assert any("rebuilding" in line and "the source differs (loras" in line for line in lines), why
    tensors = safetensors.torch.load_file(str(moved))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3
    safetensors.torch.save_file(tensors, str(moved))  # same path and name, other weights
    with pytest.raises(_Rebuild):
        build([f"{moved}:0.8"])
    # the command line spells the same request
    args = [str(sd1.folder), "--out", str(sd1_engine), "--lora", f"{sd1.a_peft}:0.8"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert main(args) == 0


# ------------------------------------------------------------------------------------------- errors


def _networks(model):
    return {"unet": model.unet, "text_encoder": model.text_encoder}


def test_unmatched_and_unknown_keys_are_named(sd1):
    tensors, metadata = read_lora(sd1.a_kohya)
    extra = {f"lora_unet_down_blocks_7_attentions_{i}_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1)
             for i in range(7)}
    with pytest.raises(LoraError, match=r"7 key\(s\): lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight, "
                                        r".*\(2 more\) match no layer of this model") as e:
        parse_lora({**tensors, **extra}, metadata, _networks(sd1.model), "x.safetensors")
    assert "x.safetensors" in str(e.value)
    with pytest.raises(LoraError, match=r"not LoRA keys of a known layout .*DoRA.*: 1 key\(s\): "
                                        r"lora_unet_conv_in.dora_scale"):
        parse_lora({**tensors, "lora_unet_conv_in.dora_scale": torch.ones(1)}, metadata, _networks(sd1.model))
    up_only = {k: v for k, v in tensors.items() if "mid_block_attentions_0_proj_in" not in k or "lora_up" in k}
    with pytest.raises(LoraError, match=r"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight lack their down"):
        parse_lora(up_only, metadata, _networks(sd1.model))


def test_lora_of_another_family_is_refused(sd1, sd2):
    """An SD 2.x LoRA on SD 1.x: the tiny pair differs in proj_in/out (Linear vs 1x1 conv); the
    full-size pair (built on the meta device: shapes, no memory) in widths 1024 vs 768."""
    tensors, metadata = read_lora(sd2.x_peft)
    with pytest.raises(LoraError, match=r"have shapes that do not fit this model, so the LoRA was made for another "
                                        r"model family .*unet.down_blocks.0.attentions.0.proj_in"):
        parse_lora(tensors, metadata, _networks(sd1.model), sd2.x_peft)
    from export.configs import preset
    from export.text_encoder import build_text_encoder
    from export.unet import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = {"unet": UNet2DConditionModel(preset("sd15").unet),
                "text_encoder": build_text_encoder(preset("sd15").text_encoder)}
    # what a LoRA trained on SD 2.1 holds: cross-attention keys and text layers of width 1024, 23 layers
    shapes = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((4, 1024), (320, 4)),
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((4, 1024), (1024, 4)),
              "lora_te_text_model_encoder_layers_20_self_attn_q_proj": ((4, 1024), (1024, 4))}
    sd21_lora = {}
    for name, (down, up) in shapes.items():
        sd21_lora[f"{name}.lora_down.weight"], sd21_lora[f"{name}.lora_up.weight"] = torch.zeros(down), torch.zeros(up)
    with pytest.raises(LoraError, match=r"2 layer\(s\) have shapes .* another model family .*attn2.to_k: down "
                                        r"\(4, 1024\), up \(320, 4\), weight \(320, 768\).*2 key\(s\): "
                                        r"lora_te_text_model_encoder_layers_20"):
        parse_lora(sd21_lora, {}, sd15, "sd21-style.safetensors")


def test_sdxl_lora_is_refused(sd1):
    down, up = torch.zeros(2, 32), torch.zeros(32, 2)
    for keys in (["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"],
                 ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]):
        tensors = {f"{k}.lora_down.weight": down for k in keys} | {f"{k}.lora_up.weight": up for k in keys}
        with pytest.raises(LoraError, match="this is an SDXL LoRA"):
            parse_lora(tensors, {}, _networks(sd1.model))
    with pytest.raises(LoraError, match="this is an SDXL LoRA"):
        parse_lora({"text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
                    "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_B.weight": up}, {}, _networks(sd1.model))


def test_pickled_lora_is_refused_without_unpickling(tmp_path, sd1):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("the pickle was loaded",))

    for name in ("lora.pt", "lora.safetensors"):  # a pickle, also under a .safetensors name
        path = tmp_path / name
        torch.save({"lora_unet_conv_in.lora_down.weight": torch.zeros(1), "x": Boom()}, str(path))
        with pytest.raises(LoraError, match=r"read as \.safetensors only \(a pickle"):
            read_lora(path)
    with pytest.raises(LoraError, match=r"read as \.safetensors only"):
        build_engine(str(sd1.folder), tmp_path / "engine", loras=[tmp_path / "lora.pt"], progress=lambda line: None)
    assert not (tmp_path / "engine").exists()


def test_bad_arguments_are_refused_before_any_work(sd1, tmp_path):
    with pytest.raises(LoraError, match="does not exist"):
        build_engine(str(sd1.folder), tmp_path / "engine", loras=[tmp_path / "missing.safetensors:0.5"],
                     progress=lambda line: None)
    with pytest.raises(LoraError, match="finite"):
        build_engine(str(sd1.folder), tmp_path / "engine", loras=[(sd1.b, float("nan"))], progress=lambda line: None)

"""Checkpoint loading (export/loading/, export/convert_ldm.py): both layouts round trip, diffusers'
own save_pretrained folders load to diffusers' outputs, family / config inference from shapes, and
bad inputs give `CheckpointError` messages that name the problem."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch

from export import convert_ldm
from export.configs import preset
from export.loading.infer import infer_spec, split_single_file
from export.loading.read import TINY_DIR, CheckpointError, LoadedModel, load_model, random_model
from export.loading.save import save_diffusers, save_single_file, to_single_file_state_dict
from export.text_encoder import build_text_encoder
from export.unet import UNet2DConditionModel
from export.vae import AutoencoderKL
from runtime.compare import rel_err

torch.set_num_threads(1)  # the CI machine's cores are shared

TINY = ("tiny-sd1", "tiny-sd2", "tiny-inpaint")
# Same weights, same graph: only op-order noise is allowed between two loads of one model.
SAME_ATOL = 1e-6
# Our networks against diffusers' on identical weights, max|a - b| / max|b| (as tests/test_models.py).
PARITY_RTOL = 1e-5
# float16 storage: each weight rounds with relative error <= 2^-11; outputs of the tiny random
# networks stay within this relative error.
FP16_RTOL = 1e-2


def perturbed(model: LoadedModel, seed: int = 1) -> LoadedModel:
    """Default inits leave norms at 1 and biases at 0; perturb every tensor so that a key mix-up
    between two same-shaped tensors cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for module in (model.unet, model.vae, model.text_encoder):
        sd = module.state_dict()
        module.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()})
    return model


def inputs(model: LoadedModel, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    spec = model.spec
    return {
        "sample": torch.randn(2, spec.unet.in_channels, 8, 8, generator=g),
        "timestep": torch.tensor([1.0, 700.0]),
        "context": torch.randn(2, 77, spec.unet.cross_attention_dim, generator=g),
        "ids": torch.randint(0, spec.text_encoder["vocab_size"], (2, 77), generator=g),
        "image": torch.rand(1, 3, 16, 16, generator=g) * 2 - 1,
        "latent": torch.randn(1, spec.vae.latent_channels, 4, 4, generator=g),
    }


@torch.no_grad()
def outputs(model: LoadedModel, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mean, std = model.vae.encode(x["image"])
    return {
        "unet": model.unet(x["sample"], x["timestep"], x["context"]),
        "vae_mean": mean,
        "vae_std": std,
        "vae_decode": model.vae.decode(x["latent"]),
        "text": model.text_encoder(input_ids=x["ids"]).last_hidden_state,
    }


def assert_same_weights(a: LoadedModel, b: LoadedModel) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sb[k].dtype == torch.float32, (name, k)
            assert torch.equal(sa[k], sb[k]), (name, k)


@pytest.fixture(scope="module", params=TINY)
def tiny(request) -> LoadedModel:
    return perturbed(random_model(request.param, seed=0))


# ---- round trips through both layouts ----


def test_random_model_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = random_model("tiny-sd1", seed=3), random_model("tiny-sd1", seed=3), random_model("tiny-sd1", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert_same_weights(a, b)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    assert a.source == {"kind": "preset", "path": None, "sha256": None, "preset": "tiny-sd1", "seed": 3}
    assert not a.unet.training and not a.text_encoder.training
    assert sorted(p.name for p in a.tokenizer_dir.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


def test_diffusers_and_single_file_layouts_load_identically(tiny, tmp_path):
    x = inputs(tiny)
    want = outputs(tiny, x)
    save_diffusers(tiny, tmp_path / "diffusers")
    save_single_file(tiny, tmp_path / "model.safetensors")
    for path, kind in ((tmp_path / "diffusers", "diffusers"), (tmp_path / "model.safetensors", "single_file")):
        loaded = load_model(path)
        assert loaded.source["kind"] == kind and loaded.source["path"] == str(path)
        assert len(loaded.source["sha256"]) == 64
        assert_same_weights(tiny, loaded)
        got = outputs(loaded, x)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=SAME_ATOL, msg=f"{kind} {name}")
    assert load_model(tmp_path / "diffusers").spec == tiny.spec


def test_single_file_infers_family_and_config(tiny, tmp_path):
    save_single_file(tiny, tmp_path / "model.safetensors")
    spec = load_model(tmp_path / "model.safetensors").spec
    assert spec.family == tiny.spec.family
    assert (spec.unet, spec.vae, spec.text_encoder) == (tiny.spec.unet, tiny.spec.vae, tiny.spec.text_encoder)
    assert spec.pad_token == tiny.spec.pad_token
    assert spec.prediction_type == "epsilon"  # cannot be inferred: explicit option
    v = load_model(tmp_path / "model.safetensors", prediction_type="v_prediction")
    assert v.spec.prediction_type == "v_prediction"


def test_single_file_layout_is_the_original_one(tiny):
    keys = set(to_single_file_state_dict(tiny))
    sd = to_single_file_state_dict(tiny)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.time_embed.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert sd["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 4  # 1x1 conv
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    layers = tiny.spec.text_encoder["num_hidden_layers"]
    if tiny.spec.family.startswith("sd1"):
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    else:
        p = "cond_stage_model.model."
        assert {p + "positional_embedding", p + "token_embedding.weight", p + "ln_final.weight"} <= keys
        # the OpenCLIP tower keeps one more block than SD 2.x uses (it reads the penultimate)
        assert p + f"transformer.resblocks.{layers}.attn.in_proj_weight" in keys
        hidden = tiny.spec.text_encoder["hidden_size"]
        assert sd[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * hidden, hidden)


def test_single_file_layout_agrees_with_diffusers_converter(tiny):
    """diffusers' own LDM -> diffusers conversion, as an independent reference of the layout."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    sd = to_single_file_state_dict(tiny)
    theirs = {
        "unet": sfu.convert_ldm_unet_checkpoint(sd, tiny.spec.unet.to_dict()),
        "vae": sfu.convert_ldm_vae_checkpoint(sd, tiny.spec.vae.to_dict()),
    }
    if tiny.spec.family.startswith("sd1"):
        text = sfu.convert_ldm_clip_checkpoint(sd)
    else:
        text = sfu.convert_open_clip_checkpoint(tiny.text_encoder, sd)
    theirs["text_encoder"] = convert_ldm.clip_from_file(text)
    for name, converted in theirs.items():
        ours = getattr(tiny, name).state_dict()
        # diffusers drops only block 23 of OpenCLIP (ViT-H); the tiny tower's spare block stays in
        assert set(ours) <= set(converted), name
        assert set(converted) - set(ours) <= {k for k in converted if k.startswith("encoder.layers.")}, name
        for k, v in ours.items():
            assert torch.equal(converted[k], v), (name, k)


def test_ckpt_with_state_dict_wrapper_and_fp16_weights(tmp_path):
    model = perturbed(random_model("tiny-sd1"))
    sd = {k: v.half() for k, v in to_single_file_state_dict(model).items()}
    sd["model_ema.decay"] = torch.tensor(0.999)  # EMA bookkeeping and schedule buffers are skipped
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sd, "global_step": torch.tensor(5)}, tmp_path / "model.ckpt")
    loaded = load_model(tmp_path / "model.ckpt")
    assert loaded.spec.family == "sd1"
    for name in ("unet", "vae", "text_encoder"):
        for k, v in getattr(loaded, name).state_dict().items():
            assert v.dtype == torch.float32
            torch.testing.assert_close(v, getattr(model, name).state_dict()[k].half().float(), rtol=0, atol=0)


def test_fp16_diffusers_round_trip(tiny, tmp_path):
    save_diffusers(tiny, tmp_path / "fp16", fp16=True)
    stored = safetensors.torch.load_file(tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    loaded = load_model(tmp_path / "fp16")
    x = inputs(tiny)
    want, got = outputs(tiny, x), outputs(loaded, x)
    for name in want:
        assert got[name].dtype == torch.float32
        assert rel_err(got[name], want[name]) < FP16_RTOL, name


# ---- folders written by diffusers itself, and ours read by diffusers ----


def diffusers_pipeline(model: LoadedModel):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    unet = diffusers.UNet2DConditionModel.from_config(model.spec.unet.to_dict())
    unet.load_state_dict(model.unet.state_dict())
    vae = diffusers.AutoencoderKL.from_config(model.spec.vae.to_dict())
    vae.load_state_dict(model.vae.state_dict())
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**model.spec.text_encoder))
    text.load_state_dict(model.text_encoder.state_dict())
    tokenizer = transformers.CLIPTokenizer.from_pretrained(model.tokenizer_dir)
    scheduler = diffusers.PNDMScheduler.from_config(model.spec.scheduler)
    cls = diffusers.StableDiffusionInpaintPipeline if model.spec.family.endswith("inpaint") else (
        diffusers.StableDiffusionPipeline)
    return cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def diffusers_outputs(pipe, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dist = pipe.vae.encode(x["image"]).latent_dist
    return {
        "unet": pipe.unet(x["sample"], x["timestep"], x["context"]).sample,
        "vae_mean": dist.mean,
        "vae_std": dist.std,
        "vae_decode": pipe.vae.decode(x["latent"]).sample,
        "text": pipe.text_encoder(input_ids=x["ids"]).last_hidden_state,
    }


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_diffusers_save_pretrained_folder_loads(variant, tmp_path):
    model = perturbed(random_model("tiny-sd2"))
    pipe = diffusers_pipeline(model)
    if variant:
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(tmp_path / "sd", variant=variant)
    pipe = pipe.to(torch.float32)
    loaded = load_model(tmp_path / "sd")
    assert loaded.spec == model.spec
    # transformers 5 writes tokenizer.json only: vocab.json / merges.txt are extracted from it
    transformers = pytest.importorskip("transformers")
    ours = transformers.CLIPTokenizer.from_pretrained(loaded.tokenizer_dir)
    for prompt in ("a photo of an astronaut riding a horse", "ünïcode, punctuation!?"):
        assert ours(prompt, padding="max_length").input_ids == pipe.tokenizer(prompt, padding="max_length").input_ids
    assert ours.pad_token == "!"
    x = inputs(model)
    want, got = diffusers_outputs(pipe.to(torch.float32), x), outputs(loaded, x)
    for name in want:
        assert rel_err(got[name], want[name]) < PARITY_RTOL, name


def test_diffusers_reads_our_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = perturbed(random_model("tiny-inpaint"))
    save_diffusers(model, tmp_path / "sd")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    x = inputs(model)
    want, got = diffusers_outputs(pipe, x), outputs(model, x)
    for name in want:
        assert rel_err(got[name], want[name]) < PARITY_RTOL, name


def test_save_diffusers_replaces_a_diffusers_folder_only(tmp_path):
    model = random_model("tiny-sd1")
    save_diffusers(model, tmp_path / "sd")
    reloaded = load_model(tmp_path / "sd")
    save_diffusers(reloaded, tmp_path / "sd", fp16=True)  # onto itself: tokenizer_dir is inside
    assert load_model(tmp_path / "sd").spec == model.spec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]  # no staging folder left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a diffusers folder; refusing"):
        save_diffusers(model, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_folder_without_tokenizer_uses_packaged_vocabulary(tmp_path):
    model = random_model("tiny-sd2")
    save_diffusers(model, tmp_path / "sd")
    shutil.rmtree(tmp_path / "sd" / "tokenizer")
    loaded = load_model(tmp_path / "sd")
    config = json.loads((loaded.tokenizer_dir / "special_tokens_map.json").read_text())
    assert config["pad_token"] == "!"


# ---- family and config inference on full-size shapes (meta tensors: no memory) ----


def meta_single_file(spec) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = LoadedModel(spec, UNet2DConditionModel(spec.unet), AutoencoderKL(spec.vae),
                            build_text_encoder(spec.text_encoder), Path(), {})
    return to_single_file_state_dict(model)


def infer_from_ldm(sd: dict[str, torch.Tensor]):
    return infer_spec(*split_single_file(sd))


def sd2_inpaint():
    sd21 = preset("sd21")
    return replace(sd21, family="sd2-inpaint", unet=replace(sd21.unet, in_channels=9))


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd15-inpaint", "sd2-inpaint"])
def test_full_size_family_and_config_inference(name):
    spec = sd2_inpaint() if name == "sd2-inpaint" else preset(name)
    sd = meta_single_file(spec)
    if spec.family.startswith("sd2"):  # the real OpenCLIP ViT-H tower: 24 blocks, SD 2.x uses 23
        assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" in sd
    got = infer_from_ldm(sd)
    assert got.family == spec.family
    assert got.unet == spec.unet
    assert got.vae == spec.vae
    assert got.text_encoder == spec.text_encoder
    assert got.pad_token == spec.pad_token
    assert got.prediction_type == "epsilon"


def test_inference_of_an_unlisted_architecture_uses_the_family_rules():
    # An SD 2.x-style U-Net with narrower blocks: heads follow the 64-dim head rule.
    sd21 = preset("sd21")
    spec = replace(sd21, unet=replace(sd21.unet, block_out_channels=(256, 512, 1024, 1024),
                                      attention_head_dim=(4, 8, 16, 16)))
    got = infer_from_ldm(meta_single_file(spec))
    assert got.unet == spec.unet
    sd15 = preset("sd15")
    spec = replace(sd15, unet=replace(sd15.unet, layers_per_block=1, block_out_channels=(320, 640, 1280, 1280)))
    assert infer_from_ldm(meta_single_file(spec)).unet == spec.unet


# ---- bad inputs ----


def test_missing_path_and_unknown_preset():
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_model("/nonexistent/model.safetensors")
    with pytest.raises(CheckpointError, match="unknown preset 'sd99'") as e:
        random_model("sd99")
    assert "tiny-sd1" in str(e.value) and "sd15" in str(e.value)
    with pytest.raises(CheckpointError, match="not a preset") as e:
        load_model("sd99")
    assert "tiny-sd2" in str(e.value)


def test_embedded_tiny_model_missing_is_explained():
    if (TINY_DIR / "model_index.json").is_file():
        assert load_model("tiny").source["kind"] == "preset"
    else:
        with pytest.raises(CheckpointError, match="not built yet.*train_demo"):
            load_model("tiny")


def test_truncated_safetensors(tmp_path):
    save_single_file(random_model("tiny-sd1"), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable .safetensors file .truncated"):
        load_model(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "junk.safetensors")


class Payload:
    """Stands for the arbitrary Python objects old training checkpoints pickle."""


def test_pickle_with_python_objects_is_refused(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callback": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="arbitrary Python objects") as e:
        load_model(tmp_path / "evil.ckpt")
    assert "Payload" in str(e.value) and "safetensors" in str(e.value)
    (tmp_path / "junk.ckpt").write_bytes(b"\x80\x02garbage" * 8)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "junk.ckpt")


def test_folder_missing_a_component(tmp_path):
    save_diffusers(random_model("tiny-sd1"), tmp_path / "sd")
    shutil.rmtree(tmp_path / "sd" / "vae")
    with pytest.raises(CheckpointError, match="no vae/ component"):
        load_model(tmp_path / "sd")
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "sd" / "vae").mkdir()
    with pytest.raises(CheckpointError, match=r"unet/ has no weights"):
        load_model(tmp_path / "sd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        load_model(tmp_path / "empty")


def test_unsupported_families(tmp_path):
    sdxl = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    safetensors.torch.save_file(sdxl, tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match="SDXL"):
        load_model(tmp_path / "sdxl.safetensors")
    other = {"transformer_blocks.0.attn.to_q.weight": torch.zeros(1), "pos_embed.proj.weight": torch.zeros(1)}
    safetensors.torch.save_file(other, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="no Stable Diffusion U-Net") as e:
        load_model(tmp_path / "other.safetensors")
    assert "transformer_blocks.0" in str(e.value) and "pos_embed.proj" in str(e.value)


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    sd = to_single_file_state_dict(random_model("tiny-sd1"))
    del sd["model.diffusion_model.out.2.weight"]
    sd["first_stage_model.decoder.extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "U-Net" in msg and "1 missing key(s): conv_out.weight" in msg
    sd = to_single_file_state_dict(random_model("tiny-sd1"))
    sd["first_stage_model.decoder.extra.weight"] = torch.zeros(1)
    sd["something.else"] = torch.zeros(1)
    safetensors.torch.save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="1 unexpected key.s.: something.else"):
        load_model(tmp_path / "extra.safetensors")
    del sd["something.else"]
    safetensors.torch.save_file(sd, tmp_path / "extra_vae.safetensors")
    with pytest.raises(CheckpointError, match="VAE weights do not fit the model: 1 unexpected key.s.: decoder.extra"):
        load_model(tmp_path / "extra_vae.safetensors")


def test_key_lists_are_capped(tmp_path):
    sd = to_single_file_state_dict(random_model("tiny-sd1"))
    sd = {k: v for k, v in sd.items() if not k.startswith(convert_ldm.CLIP_PREFIX + "text_model.encoder.")}
    safetensors.torch.save_file(sd, tmp_path / "no_layers.safetensors")
    with pytest.raises(CheckpointError, match=r"text encoder weights do not fit the model: \d+ missing key\(s\): "
                       r"(encoder\.layers\.\S+, ){10}\.\.\. \(\d+ more\)"):
        load_model(tmp_path / "no_layers.safetensors")

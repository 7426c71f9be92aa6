"""`build-engine SRC --vae PATH`: another AutoencoderKL in place of the source's (issue 26), and
taesdxl, the tiny autoencoder of SDXL (`--tiny-vae`, issue 25), on SDXL folders.

The references are diffusers' own: each replacement VAE is a random `diffusers.AutoencoderKL` made by
diffusers at the source model's sizes (other weights, another `scaling_factor`, `force_upcast` false as
madebyollin/sdxl-vae-fp16-fix's config.json sets it), saved by `save_pretrained`; the single files
carry the same weights in the original LDM layout, each key checked against diffusers' own LDM -> diffusers
conversion (`single_file_utils.convert_ldm_vae_checkpoint`) before the file is written, once as an
A1111 `.vae.pt` pickle (`{"state_dict": ...}` with the training loss's keys and the EMA counters A1111
drops) and once as a `.vae.safetensors` with the `first_stage_model.` prefix. The tiny SD 1.x model is
the tiny-sd1 preset saved as a diffusers folder; the tiny SDXL model is tests/test_sdxl.py's (diffusers'
dummy components); the taesdxl files are madebyollin's layout of a diffusers `AutoencoderTiny`
(tests/test_tiny_vae_added.py `_single_files`), named `taesdxl_*`. Images are compared with diffusers'
StableDiffusionPipeline / StableDiffusionXLPipeline given that VAE (`vae=`), at fp32 on ONNX Runtime
and OpenVINO (f32): >= PARITY_PSNR_DB (tests/psnr_bounds.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import runtime
from psnr_bounds import PARITY_PSNR_DB, assert_psnr
from runtime.compare import psnr, rel_err
from runtime.folder.manifest import load_manifest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

PROMPT = "a watercolor painting of a lighthouse at dusk"
NEGATIVE = "blurry, low quality"
BACKENDS = [("onnxruntime", {}), ("openvino", {"inference_precision": "f32"})]
# the replacement's own config values: not the source's 0.18215 / true
FIX = {"scaling_factor": 0.25, "force_upcast": False}


def _quiet(line: str) -> None:
    pass


def _ldm_state(vae) -> dict:
    """The diffusers AutoencoderKL `vae`'s weights in the LDM layout (export/convert_ldm.py's rules),
    checked key for key against diffusers' own LDM -> diffusers conversion."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from export import convert_ldm

    ldm = convert_ldm.vae_to_ldm(vae.state_dict())
    back = convert_ldm_vae_checkpoint({convert_ldm.VAE_PREFIX + k: v for k, v in ldm.items()}, dict(vae.config))
    want = vae.state_dict()
    assert set(back) == set(want) and all(torch.equal(back[k].reshape(want[k].shape), want[k]) for k in want)
    assert any(k.startswith("encoder.down.0.block.") for k in ldm) and "post_quant_conv.weight" in ldm
    return ldm


def _replacement_files(vae, root: Path) -> dict[str, Path]:
    """The diffusers folder, an A1111 .vae.pt and a prefixed .vae.safetensors of `vae`."""
    vae.save_pretrained(str(root / "vae-fix"))
    ldm = _ldm_state(vae)
    extra = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4),
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)}
    torch.save({"state_dict": {**ldm, **extra}, "global_step": 840000}, root / "fix.vae.pt")
    safetensors_torch.save_file({f"first_stage_model.{k}": v.contiguous() for k, v in ldm.items()},
                                str(root / "fix.vae.safetensors"))
    return {"folder": root / "vae-fix", "pt": root / "fix.vae.pt", "safetensors": root / "fix.vae.safetensors"}


def _sd1_pipe(folder: Path, vae=None):
    kw = {} if vae is None else {"vae": vae}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        local_files_only=True, dtype=torch.float32, **kw)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(tiny-sd1 diffusers folder, the replacement AutoencoderKL, its files, the engine folder built
    with --vae the AutoencoderKL folder, the build's progress lines)."""
    from export.build import build_engine
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    root = tmp_path_factory.mktemp("vae-sd1")
    folder = save_diffusers(random_model("tiny-sd1", seed=0), root / "diffusers")
    base = dict(diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True).config)
    torch.manual_seed(11)
    fix = diffusers.AutoencoderKL.from_config({**base, **FIX}).eval()
    files = _replacement_files(fix, root)
    lines: list[str] = []
    engine = build_engine(str(folder), root / "engine", vae=files["folder"], progress=lines.append)
    return folder, fix, files, engine, lines


# ------------------------------------------------------------------------------------------ reading

def test_files_read_to_the_same_weights(sd1, tmp_path):
    """The diffusers folder, a pipeline folder's vae/, the LDM .vae.pt (A1111's loss and EMA keys
    dropped) and the prefixed LDM .vae.safetensors all read to the AutoencoderKL's state dict; only the
    folder has its own config; a pre-0.14 diffusers file's attention names are renamed."""
    from export.loading.vae_source import read_vae

    folder, fix, files, _, _ = sd1
    want = fix.state_dict()
    for name in ("folder", "pt", "safetensors"):
        got = read_vae(files[name])
        assert set(got.state) == set(want), name
        assert all(torch.equal(got.state[k], want[k]) for k in want), name
    own = read_vae(files["folder"])
    assert (own.config.scaling_factor, own.config.force_upcast) == (0.25, False)
    assert own.identity["kind"] == "diffusers" and own.identity["layout"] == "diffusers"
    single = read_vae(files["pt"])
    assert single.config is None and single.identity["layout"] == "ldm" and single.identity["kind"] == "single_file"
    assert read_vae(folder).identity["path"] == str((folder / "vae").resolve())  # a pipeline folder's vae/
    legacy = {k.replace("attentions.0.to_q.", "attentions.0.query.").replace("attentions.0.to_k.", "attentions.0.key.")
              .replace("attentions.0.to_v.", "attentions.0.value.").replace("attentions.0.to_out.0.", "attentions.0.proj_attn."):
              v for k, v in want.items()}
    assert any(".query." in k for k in legacy)
    safetensors_torch.save_file(legacy, str(tmp_path / "old.safetensors"))
    old = read_vae(tmp_path / "old.safetensors")
    assert set(old.state) == set(want) and old.identity["layout"] == "diffusers"


def test_config_comes_from_the_vae_or_the_source(sd1):
    """A folder's config is its own (scaling_factor, force_upcast); a single file's sizes are its
    tensors', the rest the source model's."""
    from export.loading.read import load_model
    from export.loading.vae_source import read_vae, with_vae

    folder, _, files, _, _ = sd1
    model = load_model(folder)
    replaced = with_vae(model, read_vae(files["folder"]))
    assert (replaced.spec.vae.scaling_factor, replaced.spec.vae.force_upcast) == (0.25, False)
    from_file = with_vae(model, read_vae(files["safetensors"]))
    assert from_file.spec.vae == model.spec.vae  # same sizes; scaling 0.18215 and force_upcast from the source
    assert model.spec.vae.scaling_factor == pytest.approx(0.18215) and model.vae is not replaced.vae


def test_mismatched_vae_is_refused(sd1, tmp_path):
    """A VAE whose latents are not the model's (channels, downsampling) is refused by name, before
    any export; an AutoencoderTiny is pointed to --tiny-vae."""
    from export.build import build_engine
    from export.convert_ldm import CheckpointError
    from export.loading.read import load_model
    from export.loading.vae_source import read_vae, with_vae

    folder = sd1[0]
    base = dict(diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True).config)
    diffusers.AutoencoderKL.from_config({**base, "latent_channels": 16}).save_pretrained(str(tmp_path / "c16"))
    deeper = {**base, "block_out_channels": [32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 3,
              "up_block_types": ["UpDecoderBlock2D"] * 3}
    safetensors_torch.save_file(diffusers.AutoencoderKL.from_config(deeper).state_dict(), str(tmp_path / "f4.safetensors"))
    model = load_model(folder)
    with pytest.raises(CheckpointError, match="16 latent channels at 1/2 size.*have 4 channels at 1/2"):
        with_vae(model, read_vae(tmp_path / "c16"))
    with pytest.raises(CheckpointError, match="4 latent channels at 1/4 size.*at 1/2 size"):
        with_vae(model, read_vae(tmp_path / "f4.safetensors"))
    with pytest.raises(CheckpointError, match="latent channels"):
        build_engine(str(folder), tmp_path / "engine", vae=tmp_path / "c16", progress=_quiet)
    assert not (tmp_path / "engine").exists() and not list(tmp_path.glob(".engine.*"))
    diffusers.AutoencoderTiny(latent_channels=4).save_pretrained(str(tmp_path / "tiny"))
    with pytest.raises(CheckpointError, match="--tiny-vae"):
        read_vae(tmp_path / "tiny")
    with pytest.raises(CheckpointError, match="no autoencoder found"):
        safetensors_torch.save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
        read_vae(tmp_path / "x.safetensors")


# ------------------------------------------------------------------------------------ built folder

def test_manifest_records_the_vae(sd1):
    _, _, files, engine, lines = sd1
    m = load_manifest(engine)
    vae = m.source["vae"]
    assert vae["path"] == str(files["folder"].resolve()) and len(vae["sha256"]) == 64
    assert (vae["kind"], vae["layout"], vae["config"]) == ("diffusers", "diffusers", "own")
    assert m.scaling_factor == 0.25  # the replacement's, not the source's 0.18215
    assert any(line.startswith("reading the VAE") for line in lines)


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_txt2img_matches_diffusers_with_that_vae(sd1, backend, options):
    """8 Euler steps at guidance 7.5 equal StableDiffusionPipeline(vae=the replacement); the
    source's own VAE gives another image."""
    folder, fix, _, engine, _ = sd1
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, output_type="np")
    with runtime.load(engine, backend=backend, **options) as ours:
        h, w = ours.default_size
        s = ours.vae_scale_factor
        latents = np.random.default_rng(5).standard_normal((1, 4, h // s, w // s), dtype=np.float32)
        got = ours.txt2img(PROMPT, scheduler="euler", latents=latents, progress=False, **kw).images
    want = _sd1_pipe(folder, fix)(PROMPT, latents=torch.from_numpy(latents), height=h, width=w, **kw).images
    assert_psnr(got, want, f"txt2img --vae (AutoencoderKL folder) vs diffusers, {backend}")
    assert got.std() > 0.01
    original = _sd1_pipe(folder)(PROMPT, latents=torch.from_numpy(latents), height=h, width=w, **kw).images
    assert psnr(original, want) < PARITY_PSNR_DB - 40


def test_torch_reference_engine_uses_the_recorded_vae(sd1):
    from export.torch_engine import open_engine

    _, fix, _, engine, _ = sd1
    latent = np.random.default_rng(1).standard_normal((1, 4, 8, 10), dtype=np.float32)
    e = open_engine(engine, load_manifest(engine), "vae_decoder")
    try:
        got = e.run({"latent": latent})["image"]
    finally:
        e.close()
    with torch.no_grad():
        want = fix.decode(torch.from_numpy(latent) / 0.25).sample.numpy()
    assert rel_err(got, want) < 1e-5


def test_a_changed_vae_rebuilds_and_a_single_file_builds(sd1, tmp_path):
    """The same --vae reuses the folder; another file (the same weights as an A1111 .vae.pt) rebuilds
    it, naming the VAE; that folder's decoder is the replacement's weights at the source's scaling
    (a single file has no config); without --vae the source's VAE comes back."""
    from export.build import build_engine
    from runtime.engines import open_engines

    _, fix, files, engine, _ = sd1
    folder = sd1[0]
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    lines: list[str] = []
    build_engine(str(folder), copy, vae=files["folder"], progress=lines.append)
    assert any(line.startswith("up to date:") for line in lines)
    lines.clear()
    build_engine(str(folder), copy, vae=files["pt"], progress=lines.append)
    rebuilt = [line for line in lines if line.startswith("rebuilding")]
    assert rebuilt and "vae" in rebuilt[0], lines
    m = load_manifest(copy)
    assert (m.source["vae"]["kind"], m.source["vae"]["layout"], m.source["vae"]["config"]) == \
        ("single_file", "ldm", "source model")
    assert m.scaling_factor == pytest.approx(0.18215)
    latent = np.random.default_rng(2).standard_normal((2, 4, 10, 6), dtype=np.float32)
    _, engines = open_engines(copy, m, "onnxruntime", networks=("vae_decoder",))
    try:
        got = engines["vae_decoder"].run({"latent": latent})["image"]
    finally:
        for e in engines.values():
            e.close()
    with torch.no_grad():
        want = fix.decode(torch.from_numpy(latent) / m.scaling_factor).sample.numpy()
    assert rel_err(got, want) < 1e-4
    assert _reuse_problem_of(folder, copy, files["pt"]) is None
    assert "vae" in _reuse_problem_of(folder, copy, files["safetensors"])  # same weights, another file
    assert "vae" in _reuse_problem_of(folder, copy, None)


def _reuse_problem_of(folder: Path, engine: Path, vae: Path | None) -> str | None:
    """What the build's up-to-date check says of `engine` for `folder` with `vae` (no export)."""
    from export.build import _reuse_problem, source_identity, tool_versions
    from export.loading.vae_source import read_vae

    m = load_manifest(engine)
    identity = {**source_identity(folder), "prediction_type": None}
    if vae is not None:
        identity["vae"] = read_vae(vae).identity
    return _reuse_problem(engine, identity, m.precision, m.shapes, tool_versions(), False)


def test_network_precision_follows_the_replacement_force_upcast(sd1):
    """fp16 folders: the source's VAE (force_upcast true) keeps fp32 VAE graphs; a replacement whose
    config says force_upcast false gets fp16 ones; a single file keeps the source's choice."""
    from export.build import network_precision
    from export.loading.read import load_model
    from export.loading.vae_source import read_vae, with_vae

    folder, _, files, _, _ = sd1
    model = load_model(folder)
    names = ("unet", "vae_decoder", "vae_encoder")
    assert [network_precision(model.spec, n, "fp16") for n in names] == ["fp16", "fp32", "fp32"]
    fixed = with_vae(model, read_vae(files["folder"])).spec
    assert [network_precision(fixed, n, "fp16") for n in names] == ["fp16", "fp16", "fp16"]
    assert [network_precision(fixed, n, "fp32") for n in names] == ["fp32", "fp32", "fp32"]
    single = with_vae(model, read_vae(files["pt"])).spec
    assert [network_precision(single, n, "fp16") for n in names] == ["fp16", "fp32", "fp32"]


def test_cli_passes_vae(monkeypatch, tmp_path):
    from export import cli

    seen = {}
    monkeypatch.setattr(cli, "build_engine", lambda *a, **kw: seen.update(kw))
    assert cli.main(["tiny-sd1", "--out", str(tmp_path / "e"), "--vae", str(tmp_path / "v.vae.pt")]) == 0
    assert seen["vae"] == str(tmp_path / "v.vae.pt")


# ------------------------------------------------------------------------------------------- SDXL

@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(tiny SDXL diffusers folder, the fp16-fix-style AutoencoderKL, the AutoencoderTiny, the engine
    folder built with --vae the AutoencoderKL folder and --tiny-vae the taesdxl_* files)."""
    from test_sdxl import VAE, _components
    from test_tiny_vae_added import TINY_VAE, _single_files

    from export.build import build_engine

    root = tmp_path_factory.mktemp("vae-sdxl")
    diffusers.StableDiffusionXLPipeline(**_components(root)).save_pretrained(str(root / "diffusers"))
    torch.manual_seed(5)
    fix = diffusers.AutoencoderKL(**{**VAE, "force_upcast": False}).eval()  # sdxl-vae-fp16-fix: force_upcast false
    fix.save_pretrained(str(root / "sdxl-vae-fp16-fix"))
    torch.manual_seed(9)
    tiny = diffusers.AutoencoderTiny(**TINY_VAE).eval()
    taesd = _single_files(tiny, root / "taesdxl")
    for half in ("encoder", "decoder"):
        (taesd / f"taesd_{half}.safetensors").rename(taesd / f"taesdxl_{half}.safetensors")
    engine = build_engine(str(root / "diffusers"), root / "engine", vae=root / "sdxl-vae-fp16-fix",
                          tiny_vae=taesd, progress=_quiet)
    return root / "diffusers", fix, tiny, engine


def _sdxl_reference(folder: Path, vae):
    from test_sdxl import SCHEDULER

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder), vae=vae, local_files_only=True,
                                                               dtype=torch.float32)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(SCHEDULER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_manifest(sdxl):
    folder, _, _, engine = sdxl
    m = load_manifest(engine)
    assert m.family == "sdxl" and m.source["vae"]["config"] == "own"
    assert m.networks["vae_decoder"]["precision"] == "fp32"
    tiny = m.networks["vae_decoder_tiny"]
    assert tiny["source"]["prefix"] == "taesdxl" and tiny["scaling_factor"] == 1.0
    assert m.scaling_factor == pytest.approx(0.13025) and m.tiny_vae == "added"


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_sdxl_txt2img_with_the_replacement_and_taesdxl(sdxl, backend, options):
    """The default decode equals StableDiffusionXLPipeline(vae=the fp16-fix-style AutoencoderKL);
    vae="tiny" equals it with vae=the AutoencoderTiny (taesdxl)."""
    folder, fix, tiny, engine = sdxl
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0, output_type="np")
    with runtime.load(engine, backend=backend, **options) as ours:
        h, w = ours.default_size
        s = ours.vae_scale_factor
        latents = np.random.default_rng(3).standard_normal((1, 4, h // s, w // s), dtype=np.float32)
        full = ours.txt2img(PROMPT, scheduler="euler", latents=latents, progress=False, **kw).images
        small = ours.txt2img(PROMPT, scheduler="euler", latents=latents, progress=False, vae="tiny", **kw).images
    ref = dict(latents=torch.from_numpy(latents), height=h, width=w, **kw)
    want_full = _sdxl_reference(folder, fix)(PROMPT, **ref).images
    want_tiny = _sdxl_reference(folder, tiny)(PROMPT, **ref).images
    assert_psnr(full, want_full, f"sdxl txt2img --vae (fp16-fix-style) vs diffusers, {backend}")
    assert_psnr(small, want_tiny, f"sdxl txt2img vae=tiny (taesdxl) vs diffusers, {backend}")
    assert full.std() > 0.01 and small.std() > 0.01 and psnr(full, small) < PARITY_PSNR_DB - 40


def test_sdxl_fp16_precision_choice(sdxl):
    """An fp16 SDXL folder keeps its own VAE (force_upcast true) fp32; with the fp16-fixed VAE
    (force_upcast false) the VAE graphs are fp16; the taesdxl graphs are fp16 either way."""
    from export.build import network_precision
    from export.loading.read import load_model
    from export.loading.taesd import load_tiny_vae, with_tiny_vae
    from export.loading.vae_source import read_vae, with_vae

    folder, _, _, engine = sdxl
    model = load_model(folder)
    assert network_precision(model.spec, "vae_decoder", "fp16") == "fp32"
    fixed = with_vae(model, read_vae(load_manifest(engine).source["vae"]["path"]))
    assert [network_precision(fixed.spec, n, "fp16") for n in ("vae_decoder", "vae_encoder")] == ["fp16", "fp16"]
    tiny = with_tiny_vae(model, load_tiny_vae(load_manifest(engine).networks["vae_decoder_tiny"]["source"]["path"]))
    assert network_precision(tiny.spec, "vae_decoder_tiny", "fp16") == "fp16"


def test_taesd_for_the_wrong_family_is_refused(sdxl, tmp_path):
    """madebyollin's taesd_* files decode SD 1.x / 2.x latents, taesdxl_* SDXL's: the other pair is
    refused by its name (the shapes alone would fit)."""
    from export.convert_ldm import CheckpointError
    from export.loading.read import load_model
    from export.loading.taesd import load_tiny_vae, with_tiny_vae

    folder, _, _, engine = sdxl
    taesdxl = Path(load_manifest(engine).networks["vae_decoder_tiny"]["source"]["path"])
    for half in ("encoder", "decoder"):
        shutil.copy(taesdxl / f"taesdxl_{half}.safetensors", tmp_path / f"taesd_{half}.safetensors")
    with pytest.raises(CheckpointError, match="taesd_\\* files decode SD 1.x / 2.x latents.*taesdxl"):
        with_tiny_vae(load_model(folder), load_tiny_vae(tmp_path))


def test_sdxl_single_file_vae(sdxl, tmp_path):
    """The fp16-fix-style VAE as an LDM single file on the SDXL model: the same weights, its sizes from
    the tensors and scaling_factor / force_upcast from the source's SDXL VAE config (0.13025, true), so
    an fp16 folder keeps it fp32; decoding equals diffusers' AutoencoderKL with those weights."""
    from export.build import network_precision
    from export.loading.read import load_model
    from export.loading.vae_source import read_vae, with_vae

    folder, fix, _, _ = sdxl
    safetensors_torch.save_file({f"first_stage_model.{k}": v.contiguous() for k, v in _ldm_state(fix).items()},
                                str(tmp_path / "sdxl.vae.safetensors"))
    model = load_model(folder)
    replaced = with_vae(model, read_vae(tmp_path / "sdxl.vae.safetensors"))
    assert replaced.spec.vae == model.spec.vae and replaced.spec.vae.scaling_factor == pytest.approx(0.13025)
    assert network_precision(replaced.spec, "vae_decoder", "fp16") == "fp32"
    latent = torch.from_numpy(np.random.default_rng(4).standard_normal((1, 4, 8, 8), dtype=np.float32))
    with torch.no_grad():
        assert rel_err(replaced.vae.decode(latent).numpy(), fix.decode(latent).sample.numpy()) < 1e-5

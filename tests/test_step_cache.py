"""Step caching (DeepCache, arXiv:2312.00858) on the export side: the split of the reference U-Net,
the unet_deep / unet_shallow graphs and their shared weights file, and an end-to-end comparison
with DeepCache's own `DeepCacheSDHelper` over diffusers.

- The split caches exactly what `DeepCacheSDHelper` caches on diffusers' UNet2DConditionModel: the
  same retrieval-step output, every branch, to float rounding (it is bitwise equal here).
- `forward_deep`'s noise is `forward`'s, bitwise; `forward_shallow` on the feature of the same inputs
  reproduces it.
- Graphs (tiny presets): parity <= 1e-4 (fp32) / 1e-2 (fp16) against the PyTorch split, unet_deep's
  noise against unet's, through ONNX Runtime and OpenVINO at shapes the build did not check; the
  three U-Net graphs share one weights file, so the folder grows by the graph protos only.
- End to end: our graphs under our scheduler, interval 3, branch 0, against diffusers +
  DeepCacheSDHelper with the same weights, latents and text embeddings: >= 60 dB PSNR required; fp32
  parity reaches ~130 dB. Cached and uncached images differ by ~42 dB on this random model, so the
  strict 90 dB bound (as in test_pipeline_parity.py) tells a wrong cache apart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from export.build import BuildError, _reuse_problem, build_engine
from export.configs import preset
from export.loading.read import random_model
from export.loading.save import save_diffusers
from export.onnx_export import (
    STEP_CACHE_DATA,
    Shape,
    export_network,
    export_step_cache,
    sample_inputs,
    step_cache_dims,
)
from export.trt_compat import check_graph
from export.unet import UNet2DConditionModel, cache_split
from psnr_bounds import MIN_PSNR_DB, PARITY_PSNR_DB
from runtime import scheduler as sch
from runtime.compare import psnr, rel_err
from runtime.sampling.deepcache import cached_unet, engine_calls, plan
from runtime.engines import open_engines
from runtime.folder.manifest import load_manifest
from runtime.folder.networks import NETWORKS, STEP_CACHE_NETWORKS, UNET_NETWORKS, network_io

log = logging.getLogger(__name__)
torch.set_num_threads(1)  # the cores are shared: two torch threads on a busy machine run these small nets 3x slower

PROMPT, NEGATIVE = "a watercolor painting of a lighthouse at dusk", "blurry, low quality"
# A 3-level U-Net with SD's two layers per block: DeepCacheSDHelper's branch ids assume SD's three
# skips per level (cache_branch_id % 3), so every branch of it maps onto ours.
THREE_LEVELS = replace(preset("tiny-sd1").unet, layers_per_block=2, block_out_channels=(32, 32, 64),
                       down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                       up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def graph_bytes(folder: Path) -> int:
    """Bytes of the ONNX graphs and weights files the manifest's networks name (other tests may add
    caches or int8 files to a session folder)."""
    entries = load_manifest(folder).networks.values()
    return sum((folder / rel).stat().st_size for rel in {e[k] for e in entries for k in ("file", "external_data")
                                                          if e.get(k)})


# --- the reference split --------------------------------------------------------------------------

def test_cache_split_of_sd15():
    cfg = preset("sd15").unet
    assert cache_split(cfg, 0) == cache_split(cfg, 0)
    s = cache_split(cfg, 0)  # the last up block's last resnet, after conv_in's skip: 320 channels, latent size
    assert (s.up_block, s.resnet, s.channels, s.level) == (3, 2, 320, 0)
    s = cache_split(cfg, 3)  # the first downsampler's skip: first resnet of up_blocks[2], fed by up_blocks[1]
    assert (s.up_block, s.resnet, s.channels, s.level) == (2, 2, 640, 1)
    s = cache_split(cfg, 11)  # the deepest skip: the middle block's output
    assert (s.up_block, s.resnet, s.channels, s.level) == (0, 0, 1280, 3)
    for bad in (-1, 12, 1.0, True):
        with pytest.raises(ValueError, match=r"cache branch must be an integer in 0\.\.11"):
            cache_split(cfg, bad)


@pytest.mark.parametrize("cfg", [preset("tiny-sd2").unet, THREE_LEVELS], ids=["tiny-sd2", "three-levels"])
def test_deep_path_is_forward_and_shallow_path_reproduces_it(cfg):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cfg).eval()
    x, t = torch.randn(2, cfg.in_channels, 9, 7), torch.tensor([10.5, 900.25])  # odd size: the crop path
    c = torch.randn(2, 77, cfg.cross_attention_dim)
    branches = len(cfg.block_out_channels) * (cfg.layers_per_block + 1)
    with torch.no_grad():
        plain = unet(x, t, c)
        for branch in range(branches):
            noise, feature = unet.forward_deep(x, t, c, branch)
            split = cache_split(cfg, branch)
            down = 2 ** split.level
            assert feature.shape == (2, split.channels, -(-9 // down), -(-7 // down)), branch
            assert torch.equal(noise, plain), branch  # same operations in the same order
            assert rel_err(unet.forward_shallow(x, t, c, feature, branch), plain) <= 1e-6, branch


def _deepcache_retrieval(unet, timesteps, branch, calls):
    """Outputs of `calls` (sample, timestep, context) through diffusers' U-Net with DeepCacheSDHelper
    enabled at cache_interval = len(calls): the first call is full, the others retrieve."""
    helper_cls = pytest.importorskip("DeepCache", reason="pip install DeepCache==0.1.1 (its DeepCacheSDHelper "
                                                         "is the independent reference)").DeepCacheSDHelper
    pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=timesteps))
    helper = helper_cls(pipe)
    helper.set_params(cache_interval=len(calls), cache_branch_id=branch)
    helper.enable()
    try:
        with torch.no_grad():
            return [unet(x, t, c, return_dict=False)[0] for x, t, c in calls]
    finally:
        helper.disable()


@pytest.mark.parametrize("cfg, branches", [(THREE_LEVELS, range(9)), (preset("tiny-sd1").unet, (0, 1))],
                         ids=["three-levels-all-branches", "tiny-sd1"])
def test_split_caches_what_deepcache_caches(cfg, branches):
    """Our forward_deep + forward_shallow against diffusers' UNet2DConditionModel (same weights) under
    DeepCacheSDHelper: a full call, then two retrieval calls on other samples and timesteps."""
    import diffusers

    torch.manual_seed(1)
    ours = UNet2DConditionModel(cfg).eval()
    theirs = diffusers.UNet2DConditionModel.from_config(cfg.to_dict()).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    timesteps = torch.tensor([901, 801, 701])
    c = torch.randn(2, 77, cfg.cross_attention_dim)
    calls = [(torch.randn(2, cfg.in_channels, 9, 7), t, c) for t in timesteps]
    for branch in branches:
        ref = _deepcache_retrieval(theirs, timesteps, branch, calls)
        with torch.no_grad():
            noise, feature = ours.forward_deep(*calls[0], branch)
            got = [noise] + [ours.forward_shallow(x, t, c, feature, branch) for x, t, c in calls[1:]]
            uncached = ours(*calls[2])
        for i, (a, b) in enumerate(zip(got, ref)):
            assert rel_err(a, b) <= 1e-5, (branch, i, rel_err(a, b))
        stale = rel_err(uncached, ref[2])  # finite: a NaN would read as inf, above any lower bound
        assert math.isfinite(stale) and stale > 0.05, branch  # the retrieval step really reuses stale features


# --- graphs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def step_cache_engine(tmp_path_factory) -> Path:
    """tiny-sd1 (random weights, seed 0: the weights of the session's tiny_sd1_engine) with the step
    cache, branch 0."""
    return build_engine("tiny-sd1", tmp_path_factory.mktemp("step-cache") / "tiny-sd1", seed=0, step_cache=True,
                        progress=lambda line: None)


def test_manifest_entries_and_parity(step_cache_engine):
    manifest = load_manifest(step_cache_engine)
    assert set(manifest.networks) == set(NETWORKS + STEP_CACHE_NETWORKS)
    assert (manifest.dims.cache_channels, manifest.dims.cache_level) == (32, 0)  # tiny-sd1: conv_in's 32 channels
    for name in STEP_CACHE_NETWORKS:
        entry = manifest.networks[name]
        assert entry["branch"] == 0 and entry["precision"] == "fp32"
        assert entry["parity"]["rel"] <= 1e-4 == entry["parity"]["threshold"], name
        check = entry["parity"]["step_cache"]
        assert check["deep_vs_unet"] <= 1e-4 and check["shallow_vs_deep"] <= 1e-4
    for name in UNET_NETWORKS:
        entry = manifest.networks[name]
        assert entry["external_data"] == STEP_CACHE_DATA
        assert entry["graph_bytes"] == (step_cache_engine / entry["file"]).stat().st_size
    data = (step_cache_engine / STEP_CACHE_DATA).stat().st_size
    assert manifest.networks["unet"]["weights_bytes"] == manifest.networks["unet_deep"]["weights_bytes"] <= data
    assert manifest.networks["unet_shallow"]["weights_bytes"] < data / 5


def test_graphs_share_one_weights_file(step_cache_engine, tiny_sd1_engine):
    names = sorted(p.name for p in step_cache_engine.iterdir())
    assert names == sorted(["manifest.json", "tokenizer"] + [f"{n}.onnx" for n in NETWORKS + STEP_CACHE_NETWORKS]
                           + [STEP_CACHE_DATA])
    for name in UNET_NETWORKS:
        graph = onnx.load(str(step_cache_engine / f"{name}.onnx"), load_external_data=False)
        locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {STEP_CACHE_DATA}, name
    # the same model without the step cache: the extra graphs add under 5% (tiny-sd1: 14.4 -> 14.9 MB),
    # where a second copy of the U-Net weights would add ~25%
    plain, cached = graph_bytes(tiny_sd1_engine), graph_bytes(step_cache_engine)
    log.info("graph bytes: without step cache %d, with %d (+%.1f%%)", plain, cached, 100 * (cached / plain - 1))
    assert plain < cached < 1.05 * plain


@pytest.mark.parametrize("backend, options", [("onnxruntime", {}), ("openvino", {"inference_precision": "f32"})])
def test_engines_match_the_reference_split(step_cache_engine, backend, options):
    """At a shape the build did not check (batch 3, non-square, 3 prompt chunks), through the
    runtime's engines: unet_deep's noise equals unet's, and unet_shallow on the feature of another
    call (another sample and timestep, as at a retrieval step) equals the PyTorch forward_shallow."""
    manifest = load_manifest(step_cache_engine)
    _, engines = open_engines(step_cache_engine, backend=backend, networks=UNET_NETWORKS, **options)
    unet = random_model("tiny-sd1", seed=0).unet.eval()
    rng = np.random.default_rng(5)
    shape = Shape(3, 48, 80, 231)
    full, retrieve = (sample_inputs("unet", manifest.dims, shape, vocab_size=49408, rng=rng) for _ in range(2))
    retrieve["encoder_hidden_states"] = full["encoder_hidden_states"]
    deep = engines["unet_deep"].run(full)
    assert rel_err(deep["noise_pred"], engines["unet"].run(full)["noise_pred"]) <= 1e-4
    shallow = engines["unet_shallow"].run({**retrieve, "cache_feature": deep["cache_feature"]})["noise_pred"]
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in full.items()}
        noise, feature = unet.forward_deep(t["sample"], t["timestep"], t["encoder_hidden_states"], 0)
        r = {k: torch.from_numpy(v) for k, v in retrieve.items()}
        want = unet.forward_shallow(r["sample"], r["timestep"], r["encoder_hidden_states"], feature, 0)
    assert rel_err(deep["noise_pred"], noise.numpy()) <= 1e-4
    assert rel_err(deep["cache_feature"], feature.numpy()) <= 1e-4
    assert rel_err(shallow, want.numpy()) <= 1e-4


def test_reuse_follows_the_step_cache_request(step_cache_engine):
    lines: list[str] = []
    build_engine("tiny-sd1", step_cache_engine, seed=0, step_cache=True, progress=lines.append)
    assert any(line.startswith("up to date") for line in lines), lines
    manifest = load_manifest(step_cache_engine)
    args = (step_cache_engine, manifest.source, manifest.precision, manifest.shapes, manifest.tools, False)
    assert _reuse_problem(*args, 0) is None
    assert _reuse_problem(*args, None) == "step cache: the folder has branch 0, the request none"
    assert _reuse_problem(*args, 1) == "step cache: the folder has branch 0, the request branch 1"


def test_build_refuses_a_bad_branch_before_exporting(tmp_path):
    with pytest.raises(BuildError, match="--cache-branch 1 needs --step-cache"):
        build_engine("tiny-sd1", tmp_path / "a", cache_branch=1, progress=lambda line: None)
    with pytest.raises(ValueError, match=r"cache branch must be an integer in 0\.\.3 for this U-Net \(2 levels of 1 "
                                         r"layers\); got 4"):
        build_engine("tiny-sd1", tmp_path / "b", step_cache=True, cache_branch=4, progress=lambda line: None)
    assert not any(p.suffix == ".onnx" for p in tmp_path.rglob("*"))


def test_graphs_pass_the_offline_tensorrt_check(step_cache_engine):
    for name in STEP_CACHE_NETWORKS:
        problems = check_graph(step_cache_engine / f"{name}.onnx")
        assert not problems, f"{name}: " + "\n".join(map(str, problems))


def test_tensorrt_profiles_of_the_step_cache_unets(step_cache_engine):
    """TensorRT optimization profiles from the contract: the guidance batch (2 x max_batch) and the
    feature's channels and latent size (tiny-sd1 folder: 32-128 px, latents 16-64, max batch 4)."""
    from runtime.engines.trt_plans import network_profile

    manifest = load_manifest(step_cache_engine)
    unet = network_profile("unet", manifest.dims, manifest.shapes)
    assert network_profile("unet_deep", manifest.dims, manifest.shapes) == unet
    shallow = network_profile("unet_shallow", manifest.dims, manifest.shapes)
    assert {k: v for k, v in shallow.items() if k != "cache_feature"} == unet
    f = shallow["cache_feature"]
    assert (f.min, f.opt, f.max) == ((1, 32, 16, 16), (2, 32, 32, 32), (8, 32, 64, 64))
    deepest = replace(manifest.dims, cache_channels=64, cache_level=1)  # e.g. tiny-sd1 branch 3
    f = network_profile("unet_shallow", deepest, manifest.shapes)["cache_feature"]
    assert (f.min, f.max) == ((1, 64, 8, 8), (8, 64, 32, 32))


@pytest.mark.parametrize("preset_name, branch, precision", [("tiny-sd1", 0, "fp16"), ("tiny-sd2", 3, "fp32"),
                                                            ("tiny-inpaint", 0, "fp32")])
def test_other_presets_branches_and_fp16(tmp_path, preset_name, branch, precision):
    """fp16 graphs (float16 I/O, feature included), SD 2.x at its deepest branch (the middle block's
    output, below a downsampler: a cache_height x cache_width feature), the 9-channel U-Net."""
    model = random_model(preset_name, seed=0)
    shapes = [Shape(2, 32, 40, 154)]  # odd latent width: the crop path, and a rounded-up feature below level 0
    threshold = 1e-2 if precision == "fp16" else 1e-4
    export_network("unet", model, tmp_path, precision=precision, parity_shapes=shapes)
    result = export_step_cache(model, tmp_path, branch=branch, precision=precision, parity_shapes=shapes)
    for name, r in result.results.items():
        assert r.parity["rel"] <= threshold, name
    assert max(result.consistency["deep_vs_unet"], result.consistency["shallow_vs_deep"]) <= threshold
    dims = step_cache_dims(model.spec, branch)
    feature = network_io("unet_shallow", dims, precision)[0][-1]
    graph = onnx.load(str(tmp_path / "unet_shallow.onnx"), load_external_data=False)
    declared = {i.name: i.type.tensor_type for i in graph.graph.input}["cache_feature"]
    assert declared.elem_type == (onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT)
    assert [d.dim_param or d.dim_value for d in declared.shape.dim] == list(feature.shape)
    for name in STEP_CACHE_NETWORKS:
        assert not check_graph(tmp_path / f"{name}.onnx"), name


# --- DeepCache end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_pipe(tmp_path_factory):
    import diffusers

    folder = save_diffusers(random_model("tiny-sd1", seed=0), tmp_path_factory.mktemp("deepcache") / "tiny-sd1")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return pipe, base


@pytest.mark.parametrize("sampler, cls", [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_matches_deepcache_helper_end_to_end(diffusers_pipe, step_cache_engine, sampler, cls):
    """Same weights, latents and text embeddings, 10 steps, guidance 7.5, cache interval 3, branch 0:
    diffusers + DeepCacheSDHelper against our unet_deep / unet_shallow graphs (ONNX Runtime) under
    our scheduler with `plan(len(timesteps), 3)`, decoded by our VAE graph."""
    import diffusers

    helper_cls = pytest.importorskip("DeepCache", reason="pip install DeepCache==0.1.1 (its DeepCacheSDHelper "
                                                         "is the independent reference)").DeepCacheSDHelper
    pipe, base = diffusers_pipe
    pipe.scheduler = getattr(diffusers, cls).from_config(base)
    manifest = load_manifest(step_cache_engine)
    _, engines = open_engines(step_cache_engine, backend="onnxruntime", networks=("unet_deep", "unet_shallow",
                                                                                   "vae_decoder"))
    h, w = manifest.default_size
    s = manifest.dims.vae_scale_factor
    latents = np.random.default_rng(11).standard_normal((1, 4, h // s, w // s), dtype=np.float32)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    kw = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=10, guidance_scale=7.5,
              latents=torch.from_numpy(latents), output_type="np")
    helper = helper_cls(pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        ref = pipe(**kw).images
    finally:
        helper.disable()
    uncached = pipe(**kw).images

    start = time.perf_counter()
    schedule = sch.make_schedule(manifest.scheduler, sampler, 10)
    unet = cached_unet(*engine_calls(engines["unet_deep"], engines["unet_shallow"]), plan(len(schedule.timesteps), 3))
    model = sch.guidance(unet, {"encoder_hidden_states": cond.numpy()}, {"encoder_hidden_states": uncond.numpy()}, 7.5)
    final = sch.sample(schedule, model, sch.prepare_latents(schedule, latents))
    image = np.clip(engines["vae_decoder"].run({"latent": final})["image"] / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    log.info("%s: ours %.2f s", sampler, time.perf_counter() - start)

    value, gap = psnr(image, ref), psnr(uncached, ref)
    log.info("PSNR %s, interval 3, branch 0: ours vs DeepCache %.1f dB; DeepCache vs uncached %.1f dB",
             sampler, value, gap)
    assert value >= PARITY_PSNR_DB, value
    assert gap < MIN_PSNR_DB  # caching changes this image: the comparison above can fail


def test_pipeline_cache_interval_matches_deepcache_helper(diffusers_pipe, step_cache_engine):
    """The same comparison through the public API: pipe.txt2img(..., cache_interval=3) with its own
    text encoder and VAE, against StableDiffusionPipeline + DeepCacheSDHelper on the prompts."""
    import diffusers

    import runtime

    helper_cls = pytest.importorskip("DeepCache", reason="pip install DeepCache==0.1.1 (its DeepCacheSDHelper "
                                                         "is the independent reference)").DeepCacheSDHelper
    pipe, base = diffusers_pipe
    pipe.scheduler = diffusers.DDIMScheduler.from_config(base)
    ours = runtime.load(step_cache_engine, backend="onnxruntime")
    h, w = ours.default_size
    s = ours.vae_scale_factor
    latents = np.random.default_rng(12).standard_normal((1, 4, h // s, w // s), dtype=np.float32)
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, output_type="np")
    helper = helper_cls(pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        ref = pipe(PROMPT, latents=torch.from_numpy(latents), **kw).images
    finally:
        helper.disable()
    got = ours.txt2img(PROMPT, latents=latents, scheduler="ddim", cache_interval=3, progress=False, **kw).images
    value = psnr(got, ref)
    log.info("PSNR pipe.txt2img(cache_interval=3) vs DeepCache: %.1f dB", value)
    assert value >= PARITY_PSNR_DB, value


def test_server_extension_field_runs_the_cached_pipeline(step_cache_engine):
    """The A1111 endpoint's `sd_runtime.cache_interval` / `cache_schedule` give the pipeline's own
    cached image, which differs from the uncached one; an unknown schedule is a 422 naming the field."""
    pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
    import runtime
    from test_serve_support import LiveServer, as_array, pixels

    with runtime.load(step_cache_engine, backend="onnxruntime") as pipe:
        live = LiveServer(pipe)
        try:
            body = {"prompt": PROMPT, "steps": 8, "seed": 5, "width": 64, "height": 64, "sampler_name": "DDIM",
                    "sd_runtime": {"cache_interval": 3, "cache_schedule": "nonuniform"}}
            r = live.post("/sdapi/v1/txt2img", body)
            assert r.status_code == 200, r.text
            kw = dict(num_inference_steps=8, seed=5, height=64, width=64, scheduler="ddim", guidance_scale=7.0,
                      progress=False)
            cached = as_array(pipe.txt2img(PROMPT, cache_interval=3, cache_schedule="nonuniform", **kw).images[0])
            plain = as_array(pipe.txt2img(PROMPT, **kw).images[0])
            np.testing.assert_array_equal(pixels(r.json()["images"][0]), cached)
            assert np.abs(cached.astype(int) - plain).max() > 0
            bad = live.post("/sdapi/v1/txt2img", dict(body, sd_runtime={"cache_interval": 3, "cache_schedule": "x"}))
            assert bad.status_code == 422 and "sd_runtime.cache_schedule" in bad.json()["detail"]
        finally:
            live.stop()


def test_command_line_cache_flags_reproduce_from_the_png(step_cache_engine, tmp_path, capsys):
    """`--cache-interval/--cache-schedule/--prompt-syntax/--vae-tiling` reach the pipeline, land in
    the PNG's metadata, and `--from-png` reproduces the image bit for bit; a folder without the
    step-cache graphs is a one-line error."""
    import runtime
    from runtime.cli import main, read_metadata

    out, again = tmp_path / "cached.png", tmp_path / "again.png"
    argv = ["txt2img", str(step_cache_engine), "a (red:1.3) barn", "--steps", "6", "--seed", "3", "--scheduler",
            "dpmpp_2m", "--backend", "onnxruntime", "--cache-interval", "2", "--cache-schedule", "nonuniform",
            "--prompt-syntax", "none", "--vae-tiling", "off", "-o", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    meta = read_metadata(out)
    assert (meta["cache_interval"], meta["cache_schedule"], meta["prompt_syntax"]) == (2, "nonuniform", "none")
    assert "--cache-interval 2 --cache-schedule nonuniform --prompt-syntax none" in meta["command"]
    with runtime.load(step_cache_engine, backend="onnxruntime") as pipe:
        want = pipe.txt2img("a (red:1.3) barn", num_inference_steps=6, seed=3, scheduler="dpmpp_2m",
                            cache_interval=2, cache_schedule="nonuniform", prompt_syntax="none", progress=False)
    assert main(["--from-png", str(out), "-o", str(again), "--no-progress"]) == 0
    for path in (out, again):
        with Image.open(path) as im:
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(want.images[0]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv[:3] + ["--vae-tiling", "sometimes"])
    assert exit_.value.code == 2 and "--vae-tiling" in capsys.readouterr().err


def test_command_line_refuses_cache_interval_without_the_graphs(tiny_sd1_engine, tmp_path, capsys):
    from runtime.cli import main

    rc = main(["txt2img", str(tiny_sd1_engine), "a barn", "--cache-interval", "3", "--backend", "onnxruntime",
               "-o", str(tmp_path / "x.png"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "build-engine --step-cache" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


# --- full size -----------------------------------------------------------------------------------------

@pytest.mark.full
def test_full_size_sd15_step_cache(tmp_path):
    """SD 1.5 architecture, random weights, fp32, 256 px, branch 0: parity of unet_deep and unet_shallow
    against the PyTorch split and of unet_deep against unet, folder sizes with and without the step
    cache, and the offline TensorRT check of the new graphs (see the report in the module's log)."""
    lines: list[str] = []
    start = time.perf_counter()
    out = build_engine("sd15", tmp_path / "sd15", min_image=256, opt_image=256, max_image=512, max_batch=2,
                       step_cache=True, progress=lines.append)
    seconds = time.perf_counter() - start
    manifest = load_manifest(out)
    entries = manifest.networks
    report = {name: {k: entries[name].get(k) for k in ("export_seconds", "graph_bytes", "weights_bytes")}
              | {"rel": entries[name]["parity"]["rel"]} for name in UNET_NETWORKS}
    data = (out / STEP_CACHE_DATA).stat().st_size
    without = folder_bytes(out) - sum(entries[n]["graph_bytes"] for n in STEP_CACHE_NETWORKS)
    print(f"\nsd15 fp32 step-cache build in {seconds:.0f} s; folder {folder_bytes(out)} bytes "
          f"(without the step-cache graphs {without}); shared weights {data} bytes; {report}; "
          f"consistency {entries['unet_deep']['parity']['step_cache']}\n" + "\n".join(lines))
    assert (manifest.dims.cache_channels, manifest.dims.cache_level) == (320, 0)
    for name in STEP_CACHE_NETWORKS:
        assert entries[name]["parity"]["rel"] <= 1e-4, name
        assert not check_graph(out / entries[name]["file"]), name
    check = entries["unet_deep"]["parity"]["step_cache"]
    assert check["deep_vs_unet"] <= 1e-4 and check["shallow_vs_deep"] <= 1e-4
    assert folder_bytes(out) < 1.02 * without
    assert os.path.getsize(out / "unet_deep.onnx") < 0.01 * data

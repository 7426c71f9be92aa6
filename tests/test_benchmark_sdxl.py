"""Plumbing of `python -m benchmarks sdxl` (benchmarks/sdxl.py): a smoke run on the tiny-sdxl preset
(our engine at its default precision and at f32, diffusers fp32; the optimum and genai peers without
their venv, which must be rows that say so), and the shaping of its results: scenarios, the disk
pre-check, goals and the markdown table. The images of our f32 engine and of diffusers start from the
same latents with the same sampler, so they must agree as fp32 parity does (tests/psnr_bounds.py): a
check that the targets do the same work. Speeds are measured by the full-size run (docs/benchmarks.md),
never here."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import sdxl
from benchmarks.protocol import precision_name
from psnr_bounds import PARITY_PSNR_DB
from test_benchmark_peers import PIPE_METHODS, fake_venv

TINY = dict(model="tiny-sdxl", resolutions=(64,), steps=2, turbo_steps=1, repeats=1, warmup=1, timeout_s=900)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("diffusers")
    tmp = tmp_path_factory.mktemp("sdxl")
    absent = str(tmp / "no-venv" / "bin" / "python")
    s = sdxl.SdxlSettings(**TINY, targets=("ours", "ours-f32", "diffusers-fp32", "optimum", "genai"),
                          cache_dir=str(tmp / "cache"), peer_python={"optimum": absent, "genai": absent})
    out = tmp / "sdxl.json"
    return sdxl.run(s, out, command="pytest", log=lambda msg: None), out, s


def test_smoke_rows(smoke):
    report, out, s = smoke
    rows = json.loads(out.read_text())["results"]
    assert [sc["name"] for sc in report["scenarios"]] == ["unet-64", "turbo-1-64", "guided-2-64"]
    for key, r in rows.items():
        if key.split("/")[1] in ("ours", "ours-f32", "diffusers-fp32"):
            assert r["status"] == "ok", (key, r.get("reason"), r.get("traceback"))
            assert r["peak_rss_mb"] > 0 and r["wall_s"] > 0
    for name in ("ours", "ours-f32", "diffusers-fp32"):
        unet = rows[f"unet-64/{name}"]["unet"]
        assert unet["batch"] == 2 and unet["shapes"]["sample"] == [2, 4, 32, 32] and unet["median_s"] > 0
        assert unet["shapes"]["time_ids"] == [2, 6] and unet["repeats"] == 1
        for sc, steps in (("turbo-1-64", 1), ("guided-2-64", 2)):
            e2e = rows[f"{sc}/{name}"]["e2e"]
            assert e2e["steps"] == steps and e2e["repeats"] == 1 and e2e["median_s"] > 0
    from runtime.engines import openvino

    assert {rows[f"unet-64/{n}"]["precision"] for n in ("ours", "ours-f32", "diffusers-fp32")} <= {"bf16", "f32"}
    assert rows["guided-2-64/ours"]["precision"] == openvino.default_precision()
    assert rows["guided-2-64/ours-f32"]["precision"] == rows["guided-2-64/diffusers-fp32"]["precision"] == "f32"
    assert rows["turbo-1-64/ours"]["e2e"]["stage_timings"]["denoise"] > 0


def test_smoke_same_work_as_diffusers(smoke):
    """ours-f32 and diffusers fp32 from the same latents: Euler with trailing timesteps at guidance 0,
    and the folder's Euler guided, give the same image (fp32 parity)."""
    rows = json.loads(smoke[1].read_text())["results"]
    for sc in ("turbo-1-64", "guided-2-64"):
        db = rows[f"{sc}/ours-f32"]["e2e"]["psnr_vs_reference_db"]
        print(f"{sc}: ours-f32 vs diffusers fp32 image PSNR {db:.1f} dB (ours at default precision: "
              f"{rows[f'{sc}/ours']['e2e']['psnr_vs_reference_db']:.1f} dB)")
        assert db >= PARITY_PSNR_DB, (sc, db)
        assert "psnr_vs_reference_db" not in rows[f"{sc}/diffusers-fp32"]["e2e"]


def test_missing_venv_rows_say_why(smoke):
    report, out, s = smoke
    rows = json.loads(out.read_text())["results"]
    for sc in ("unet-64", "turbo-1-64", "guided-2-64"):
        for name in ("optimum", "genai"):
            r = rows[f"{sc}/{name}"]
            assert r["status"] == "skipped"
            assert r["reason"].startswith(f"no {name} venv: {s.peer_python[name]} does not exist")
            assert "bash benchmarks/peers/setup-optimum.sh" in r["reason"]
    md = out.with_suffix(".md").read_text()
    assert "| optimum | default | skipped: no optimum venv: " in md and "| genai | default | skipped: no genai venv" in md
    assert "optimum" not in report["prepare"]  # no export tried without the venv


def test_smoke_build_record_disk_and_report(smoke, tmp_path):
    report, out, s = smoke
    build = report["prepare"]["build"]
    assert build["status"] == "ok" and build["build"]["reused"] is False
    record = build["build"]["record"]
    assert record["build_s"] > 0 and record["peak_rss_mb"] > 0 and record["options"] == sdxl.build_options(s)
    assert json.loads(sdxl.paths(s)["build_record"].read_text()) == record
    assert report["prepare"]["prepare"]["prepare"]["diffusers_s"] > 0
    again = sdxl.prepare(s, tmp_path, False, lambda msg: None)  # built once: both steps reuse
    assert again["prepare"]["prepare"]["diffusers_s"] == 0.0
    assert again["build"]["build"]["reused"] is True and again["build"]["build"]["record"] == record
    assert report["disk"]["diffusers"]["bytes"] > 0 and report["disk"]["engine"]["bytes"] > 0
    on_disk = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text() == sdxl.render_markdown(on_disk)
    md = out.with_suffix(".md").read_text()
    assert f"| build-engine (fp32 graphs) | {record['build_s']:.1f} | {record['peak_rss_mb']:.0f} |" in md
    assert "## 1 steps Turbo-style (guidance 0, Euler trailing), 64x64 (`turbo-1-64`)" in md
    goals = {g["goal"]: g for g in report["goals"]}
    f32 = goals["guided-2-64: ours-f32 (f32) end to end >= 1.2x the fastest f32 peer"]
    assert f32["value"] == pytest.approx(on_disk["results"]["guided-2-64/diffusers-fp32"]["e2e"]["median_s"]
                                         / on_disk["results"]["guided-2-64/ours-f32"]["e2e"]["median_s"])
    assert "guided-2-64: ours peak RSS <= diffusers fp32's" in goals


def test_int8_weights_rows_beside_the_graphs(smoke, tmp_path):
    """ours-int8w: a "quantize" worker adds --quantize int8-weights to the smoke run's folder in place
    (its own time and peak RSS); its rows run the int8-weight IRs and say so in their precision, while
    ours keeps running the fp32 graphs of the same folder; the build's record stays valid, and a second
    prepare reuses both steps (the plain build keeps the scheme)."""
    pytest.importorskip("nncf", reason="int8 weights need sd-runtime[quantize] (nncf)")
    _, _, plain = smoke
    s = sdxl.SdxlSettings(**{**TINY, "warmup": 0}, targets=("ours", "ours-int8w"), scenarios=("unet-64", "turbo-1-64"),
                          cache_dir=plain.cache_dir)
    report = sdxl.run(s, tmp_path / "int8w.json", command="pytest", log=lambda msg: None)
    quant = report["prepare"]["quantize"]
    assert quant["status"] == "ok", (quant.get("reason"), quant.get("traceback"))
    record = quant["build"]["record"]
    assert record["options"]["quantize"] == "int8-weights" and record["build_s"] > 0 and record["peak_rss_mb"] > 0
    assert report["prepare"]["build"]["build"]["reused"] is True and report["prepare"]["build"]["build"]["record"]
    rows = report["results"]
    for sc in ("unet-64", "turbo-1-64"):
        assert rows[f"{sc}/ours-int8w"]["status"] == "ok", rows[f"{sc}/ours-int8w"].get("traceback")
        assert rows[f"{sc}/ours-int8w"]["precision"] == rows[f"{sc}/ours"]["precision"] + "+int8w"
        assert "int8" in rows[f"{sc}/ours-int8w"]["info"]["engine"] and "int8" not in rows[f"{sc}/ours"]["info"]["engine"]
    md = (tmp_path / "int8w.md").read_text()
    assert f"| build-engine --quantize int8-weights (in place) | {record['build_s']:.1f} |" in md
    again = sdxl.prepare(s, tmp_path, False, lambda msg: None)
    assert again["build"]["build"]["reused"] is True and again["quantize"]["build"]["reused"] is True
    assert again["quantize"]["build"]["record"] == record
    from runtime.folder.manifest import load_manifest

    assert load_manifest(sdxl.paths(s)["engine"]).quantization == "int8-weights"


# ------------------------------------------------------------------------------- result shaping


def test_scenarios_of_the_issue():
    """Defaults: the U-Net at 512 and 1024; 4 Turbo-style steps and 20 guided at 512; one guided 1024 image."""
    s = sdxl.SdxlSettings()
    every = sdxl.scenarios(s)
    assert [sc.name for sc in every] == ["unet-512", "unet-1024", "turbo-4-512", "guided-20-512", "guided-20-1024"]
    by = {sc.name: sc for sc in every}
    assert (by["turbo-4-512"].guidance_scale, by["turbo-4-512"].spacing, by["turbo-4-512"].steps) == (0.0, "trailing", 4)
    assert by["guided-20-512"].guidance_scale == 5.0 and by["guided-20-512"].spacing is None
    assert by["guided-20-512"].repeats == 3 and by["guided-20-1024"].repeats == 1  # one 1024 image
    assert by["unet-1024"].kind == "unet" and by["unet-1024"].guidance_scale > 1  # batch 2, guided
    picked = sdxl.scenarios(sdxl.SdxlSettings(scenarios=("unet-512", "guided-20-1024")))
    assert [sc.name for sc in picked] == ["unet-512", "guided-20-1024"]
    with pytest.raises(ValueError, match="unknown scenario.*turbo-9-512.*this run's are unet-512"):
        sdxl.scenarios(sdxl.SdxlSettings(scenarios=("turbo-9-512",)))


def test_parse_args():
    s, out = sdxl.parse_args(["--model", "tiny-sdxl", "--resolution", "128", "64", "--steps", "3", "--targets",
                              "ours", "genai-f32", "--genai-python", "/v/bin/python", "--out", "x.json"])
    assert (s.model, s.resolutions, s.steps, s.turbo_steps, s.targets) == ("tiny-sdxl", (64, 128), 3, 4,
                                                                          ("ours", "genai-f32"))
    assert s.peer_python == {"genai": "/v/bin/python"} and out == Path("x.json")
    d, _ = sdxl.parse_args([])
    assert d.targets == ("ours", "diffusers-fp32", "optimum", "genai") and d.resolutions == (512, 1024)
    for bad in (["--repeats", "0"], ["--resolution", "100"], ["--scenarios", "nope"], ["--model", "sd15"]):
        with pytest.raises(SystemExit):
            sdxl.parse_args(bad)


def test_peer_tasks_point_at_optimum_ir():
    s = sdxl.SdxlSettings(cache_dir="/c")
    by = {sc.name: sc for sc in sdxl.scenarios(s)}
    task = sdxl.target_task(sdxl.TARGETS["genai"], by["turbo-4-512"], s, Path("/w"))
    assert task["kind"] == "sdxl" and task["worker_module"] == "benchmarks.peers.genai_worker"
    assert task["ov_dir"] == "/c/sdxl-bench-sdxl-seed0/optimum-turbo" and task["guidance_scale"] == 0.0
    task = sdxl.target_task(sdxl.TARGETS["optimum-f32"], by["guided-20-1024"], s, Path("/w"))
    assert task["ov_dir"].endswith("/optimum") and task["precision"] == "f32" and task["e2e_repeats"] == 1
    assert task["worker_python"].endswith(".venv-optimum/bin/python") and task["latents_path"] == "/w/latents-1024.npy"
    ours = sdxl.target_task(sdxl.TARGETS["ours"], by["unet-512"], s, Path("/w"))
    assert ours["kind"] == "ours" and ours["worker_module"] == "benchmarks.sdxl_worker" and ours["image_path"] is None
    json.dumps(task)


def test_disk_pre_check(tmp_path):
    s = sdxl.SdxlSettings(cache_dir=str(tmp_path))
    needs = sdxl.disk_needs(s, optimum=True)
    w = sdxl.WEIGHTS_BYTES["sdxl"]
    assert needs == {"diffusers": w, "engine": pytest.approx(w * 1.29), "optimum": w}  # + the compile cache's bound
    assert sdxl.check_disk(needs, 100e9, tmp_path) is None
    why = sdxl.check_disk(needs, 20e9, tmp_path)
    assert why.startswith(f"not enough disk under {tmp_path}: this run writes ~13.9 GB of diffusers weights and "
                          "~17.9 GB of engine folder") and "31.8 GB in all, and 20.0 GB are free" in why
    assert "--cache-dir" in why
    assert sdxl.optimum_disk_problem(needs, 100e9, tmp_path) is None
    assert "it needs ~13.9 GB and 8.2 GB are left" in sdxl.optimum_disk_problem(needs, 40e9, tmp_path)
    p = sdxl.paths(s)
    for folder, marker in (("diffusers", "model_index.json"), ("engine", "manifest.json"), ("optimum", "model_index.json")):
        p[folder].mkdir(parents=True)
        (p[folder] / marker).write_text("{}")
    assert sdxl.disk_needs(s, optimum=True) == {"diffusers": 0.0, "engine": 0.0, "optimum": 0.0}


def test_no_disk_is_a_clear_refusal(tmp_path, monkeypatch, capsys):
    """Before anything is written: the message, exit code 2, no folder made but the cache root."""
    monkeypatch.setattr(sdxl.shutil, "disk_usage", lambda path: SimpleNamespace(free=5e9))
    code = sdxl.main(["--cache-dir", str(tmp_path), "--targets", "ours", "--out", str(tmp_path / "r.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "not enough disk under" in err and "5.0 GB are free" in err
    assert not (tmp_path / "r.json").exists() and list(sdxl.cache_root(sdxl.SdxlSettings(cache_dir=str(tmp_path)))
                                                         .iterdir()) == []


def _ok(e2e: float, rss: float, precision: str) -> dict:
    return {"status": "ok", "e2e": {"median_s": e2e, "min_s": e2e, "max_s": e2e}, "peak_rss_mb": rss,
            "precision": precision, "load_s": 1.0}


def test_goals_at_the_same_precision():
    rows = {"g/ours": _ok(1.0, 9000, "bf16"), "g/ours-f32": _ok(2.0, 15000, "f32"),
            "g/diffusers-fp32": _ok(4.0, 12000, "f32"), "g/optimum": _ok(1.5, 8000, "bf16"),
            "g/optimum-f32": _ok(2.2, 14000, "f32"), "g/genai": {"status": "failed", "reason": "killed", "precision": "default"},
            "u/ours": {"status": "ok", "unet": {"median_s": 1.0}, "peak_rss_mb": 1, "precision": "bf16"}}
    by = {g["goal"]: g for g in sdxl.goals(rows, ["g"])}
    bf16 = by["g: ours (bf16) end to end >= 1.2x the fastest bf16 peer"]
    assert bf16["value"] == pytest.approx(1.5) and bf16["pass"] is True and "optimum 1.50 s" in bf16["detail"]
    f32 = by["g: ours-f32 (f32) end to end >= 1.2x the fastest f32 peer"]
    assert f32["value"] == pytest.approx(1.1) and f32["pass"] is False and "optimum-f32 2.20 s" in f32["detail"]
    assert by["g: ours peak RSS <= diffusers fp32's"]["value"] == pytest.approx(0.75)
    assert by["g: ours-f32 peak RSS <= diffusers fp32's"]["pass"] is False
    alone = sdxl.goals({"g/ours": _ok(1.0, 9000, "bf16")}, ["g"])
    assert alone == [{"goal": "g: ours (bf16) end to end >= 1.2x the fastest bf16 peer", "value": None, "bound": 1.2,
                      "pass": None, "detail": "no bf16 peer measured"}]


def test_markdown_rows():
    s = sdxl.SdxlSettings(resolutions=(512,), scenarios=("unet-512", "guided-20-512"))
    rows = {"unet-512/ours": {"status": "ok", "unet": {"median_s": 1.25, "min_s": 1.2, "max_s": 1.3, "first_call_s": 9.0,
                                                       "cpu_median_s": 2.4}, "peak_rss_mb": 7000.4, "precision": "bf16"},
            "guided-20-512/ours": {**_ok(30.0, 8000, "bf16")},
            "guided-20-512/optimum": {"status": "failed", "precision": "default",
                                      "reason": "worker was killed by SIGKILL and no result (killed for memory?): a | b\nc"}}
    rows["guided-20-512/ours"]["e2e"]["psnr_vs_reference_db"] = 41.234
    report = {"created": "now", "machine": {"cpu": {"model": "X", "flags": {"avx2": True, "amx_bf16": False}},
                                            "memory_gib": 23.4},
              "settings": asdict(s), "scenarios": [asdict(sc) for sc in sdxl.scenarios(s)],
              "results": rows, "goals": sdxl.goals(rows, ["guided-20-512"]),
              "prepare": {"build": {"build": {"reused": True, "record": None, "note": "predates"}}},
              "disk": {"engine": {"path": "/e", "bytes": 14.2e9, "openvino_cache_bytes": 1.5e9}}}
    md = sdxl.render_markdown(report)
    assert "flags: avx2;" in md and "| engine | 14.20 (OpenVINO compile cache 1.50) | /e |" in md
    assert "| ours | bf16 | 1.25 (1.20-1.30) | 2.40 | 9.00 | 7000 | - |" in md
    assert "| ours | bf16 | 30.00 (30.00-30.00) | - | 1.00 | 8000 | 41.2 |" in md
    assert ("| optimum | default | failed: worker was killed by SIGKILL and no result (killed for memory?): a / b c "
            "| | | | |") in md
    assert "| build-engine (fp32 graphs) | - | - | reused; predates |" in md
    assert "| not measured |" in md  # no bf16 peer finished


def test_precision_names():
    assert [precision_name(v) for v in ("<Type: 'bfloat16'>", "bf16", "fp32", "f32", "torch.float32", "FP16", "x")] \
        == ["bf16", "bf16", "f32", "f32", "f32", "f16", "x"]


def test_folder_bytes_counts_links_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"x" * 1000)
    (tmp_path / "b").mkdir()
    os.link(tmp_path / "a" / "w.bin", tmp_path / "b" / "w.bin")
    (tmp_path / "b" / "s.json").write_text("{}")
    assert sdxl.folder_bytes(tmp_path) == 1002 and sdxl.folder_bytes(tmp_path / "missing") == 0


# ------------------------------------------------------------------ the venv peers, on stand-ins

OPTIMUM_XL_STUB = '''
"""Stand-in for optimum.intel's OVStableDiffusionXLPipeline: records every call beside the folder."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def _log(folder, **record):
    with open(Path(folder).parent / "optimum-calls.jsonl", "a") as f:
        f.write(json.dumps(record) + "\\n")


class _Port:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape

    def get_any_name(self):
        return self.name

    def get_partial_shape(self):
        return list(self.shape)


class _Model:
    def __init__(self, folder):
        self.folder = folder
        self.inputs = [_Port("sample", [2, 4, 32, 32]), _Port("timestep", [1]),
                       _Port("encoder_hidden_states", [2, 77, 64]), _Port("text_embeds", [2, 32]),
                       _Port("time_ids", [2, 6])]

    def reshape(self, shapes):
        _log(self.folder, call="unet.reshape", shapes={p.name: s for p, s in shapes.items()})


class _Unet:
    def __init__(self, folder):
        self.folder, self.model = folder, _Model(folder)
        self.request = SimpleNamespace(get_property=lambda name: "bf16")

    def __call__(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        _log(self.folder, call="unet", shapes=[list(sample.shape), list(encoder_hidden_states.shape),
                                               list(text_embeds.shape), list(time_ids.shape)],
             timestep=[str(timestep.dtype), list(timestep.shape)])
        return (sample * 0.5,)


class OVStableDiffusionXLPipeline:
    @classmethod
    def from_pretrained(cls, path, export=False, compile=True, local_files_only=False, ov_config=None, **kwargs):
        _log(path, call="from_pretrained", path=str(path), export=export, ov_config=ov_config, **kwargs)
        return cls(path)

    def __init__(self, path):
        self.path, self.unet, self.scheduler = Path(path), _Unet(path), None

    def save_pretrained(self, out):
        out = Path(out)
        for name in ("model_index.json", "scheduler/scheduler_config.json"):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.path / name, out / name)
        for name in ("unet/openvino_model.xml", "tokenizer/openvino_tokenizer.xml", "tokenizer_2/openvino_tokenizer.xml"):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("ir")

''' + PIPE_METHODS + '''
    def __call__(self, prompt, *, latents, height, width, **kwargs):
        _log(self.path, call="pipe", height=height, width=width, latents_shape=list(latents.shape),
             latents_sum=float(latents.double().sum()), scheduler=dict(self.scheduler.config), **kwargs)
        return SimpleNamespace(images=np.full((1, height, width, 3), 0.5, np.float32))
'''

GENAI_STUB = '''
"""Stand-in for openvino_genai: records every call beside the IR folder."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def _log(where, **record):
    with open(Path(where).parent / "genai-calls.jsonl", "a") as f:
        f.write(json.dumps(record) + "\\n")


class Generator:
    def __init__(self):
        pass


class Text2ImagePipeline:
    def __init__(self, folder):
        self.folder = folder
        _log(folder, call="pipeline", folder=str(folder))

    def reshape(self, *args):
        _log(self.folder, call="reshape", args=list(args))

    def compile(self, device, **config):
        _log(self.folder, call="compile", device=device, config=config)

    def generate(self, prompt, generator, **kwargs):
        noise = np.asarray(generator.randn_tensor([1, 4, kwargs["height"] // 2, kwargs["width"] // 2]).data)
        _log(self.folder, call="generate", latents_sum=float(noise.astype(np.float64).sum()), **kwargs)
        return SimpleNamespace(data=np.full((1, kwargs["height"], kwargs["width"], 3), 128, np.uint8))

    def get_performance_metrics(self):
        ms = lambda: 1.0
        return SimpleNamespace(get_text_encoder_infer_duration=ms, get_unet_infer_duration=ms,
                               get_vae_decoder_infer_duration=ms, get_generate_duration=ms)


class UNet2DConditionModel:
    def __init__(self, folder):
        self.folder = Path(folder).parent
        _log(self.folder, call="unet", folder=str(folder))

    def reshape(self, *args):
        _log(self.folder, call="unet.reshape", args=list(args))

    def compile(self, device, **config):
        _log(self.folder, call="unet.compile", device=device, config=config)

    def set_hidden_states(self, name, tensor):
        _log(self.folder, call="unet.set_hidden_states", name=name, shape=list(tensor.shape))

    def infer(self, sample, timestep):
        _log(self.folder, call="unet.infer", sample=list(sample.shape), timestep=[str(timestep.element_type),
                                                                                   list(timestep.shape)])
        return sample
'''


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def stub_peers(smoke, tmp_path_factory):
    """optimum and genai rows on stand-in venvs, over the smoke run's cached folders."""
    tmp = tmp_path_factory.mktemp("sdxl-peers")
    optimum = fake_venv(tmp, "optimum", {"optimum": "", "optimum.intel": OPTIMUM_XL_STUB,
                                         "openvino_tokenizers": "", "openvino_genai": GENAI_STUB})
    s = sdxl.SdxlSettings(**{**TINY, "warmup": 0}, targets=("optimum", "genai"), cache_dir=smoke[2].cache_dir,
                          peer_python={"optimum": str(optimum), "genai": str(optimum)})
    return sdxl.run(s, tmp / "peers.json", command="pytest", log=lambda msg: None), s


def test_optimum_exports_fp32_ir_and_a_turbo_view(stub_peers):
    report, s = stub_peers
    p = sdxl.paths(s)
    prep = report["prepare"]["optimum"]
    assert prep["status"] == "ok", (prep.get("reason"), prep.get("traceback"))
    assert prep["prepare"]["weights"] == "fp32 (load_in_8bit=False)" and not prep["prepare"]["reused"]
    export = _calls(p["optimum"].parent / "optimum-calls.jsonl")[0]
    assert export == {"call": "from_pretrained", "path": str(p["diffusers"]), "export": True, "ov_config": None,
                      "load_in_8bit": False}
    turbo = json.loads((p["optimum_turbo"] / "scheduler" / "scheduler_config.json").read_text())
    plain = json.loads((p["optimum"] / "scheduler" / "scheduler_config.json").read_text())
    assert turbo == {**plain, "timestep_spacing": "trailing"} and plain["timestep_spacing"] != "trailing"
    unet = "unet/openvino_model.xml"
    assert (p["optimum_turbo"] / unet).stat().st_ino == (p["optimum"] / unet).stat().st_ino  # linked, not copied


def test_optimum_rows(stub_peers):
    report, s = stub_peers
    rows, p = report["results"], sdxl.paths(s)
    for key in ("unet-64/optimum", "turbo-1-64/optimum", "guided-2-64/optimum"):
        assert rows[key]["status"] == "ok", (key, rows[key].get("reason"), rows[key].get("traceback"))
        assert rows[key]["precision"] == "bf16"
    calls = _calls(p["optimum"].parent / "optimum-calls.jsonl")
    unet = [c for c in calls if c["call"] == "unet"]
    assert unet and all(c["shapes"] == [[2, 4, 32, 32], [2, 77, 64], [2, 32], [2, 6]] for c in unet)
    assert unet[0]["timestep"] == ["torch.int64", [1]]
    assert {"call": "reshape", "batch_size": 1, "height": 64, "width": 64, "num_images_per_prompt": 1} in calls
    # guidance 0: every U-Net input but the timestep at batch 1 (optimum's reshape doubled them)
    assert {"call": "unet.reshape", "shapes": {"sample": [1, 4, 32, 32], "timestep": [1],
                                               "encoder_hidden_states": [1, 77, 64], "text_embeds": [1, 32],
                                               "time_ids": [1, 6]}} in calls
    images = [c for c in calls if c["call"] == "pipe"]
    expected = float(np.random.Generator(np.random.PCG64(0)).standard_normal((1, 4, 32, 32), dtype=np.float32)
                     .astype(np.float64).sum())
    assert [c["guidance_scale"] for c in images] == [0.0, 5.0]  # no warm-up here: one image each
    assert images[0]["scheduler"]["timestep_spacing"] == "trailing" and images[0]["num_inference_steps"] == 1
    assert images[-1]["latents_sum"] == pytest.approx(expected, rel=1e-6)


def test_genai_rows(stub_peers):
    report, s = stub_peers
    rows, p = report["results"], sdxl.paths(s)
    for key in ("unet-64/genai", "turbo-1-64/genai", "guided-2-64/genai"):
        assert rows[key]["status"] == "ok", (key, rows[key].get("reason"), rows[key].get("traceback"))
    calls = _calls(p["optimum"].parent / "genai-calls.jsonl")
    assert {"call": "unet", "folder": str(p["optimum"] / "unet")} in calls
    assert {"call": "unet.reshape", "args": [2, 64, 64, 77]} in calls
    assert sorted(c["name"] for c in calls if c["call"] == "unet.set_hidden_states") == \
        ["encoder_hidden_states", "text_embeds", "time_ids"]
    assert next(c for c in calls if c["call"] == "unet.infer")["timestep"][1] == [1]
    assert {"call": "pipeline", "folder": str(p["optimum_turbo"])} in calls
    assert {"call": "reshape", "args": [1, 64, 64, 0.0]} in calls and {"call": "reshape", "args": [1, 64, 64, 5.0]} in calls
    gen = [c for c in calls if c["call"] == "generate"]
    expected = float(np.random.Generator(np.random.PCG64(0)).standard_normal((1, 4, 32, 32), dtype=np.float32)
                     .astype(np.float64).sum())
    assert gen[-1]["latents_sum"] == pytest.approx(expected, rel=1e-6) and gen[-1]["guidance_scale"] == 5.0
    assert rows["guided-2-64/genai"]["e2e"]["stages"]["unet"] == pytest.approx(1e-3)


def test_random_sdxl_weights_as_a_diffusers_folder(tmp_path):
    """The benchmark's "prepare" step (export.loading.save.save_diffusers of random_model): an SDXL folder
    that diffusers' StableDiffusionXLPipeline reads with the same weights, and that our loader reads back."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    from export.loading.read import load_model, random_model
    from export.loading.save import save_diffusers

    model = random_model("tiny-sdxl", seed=3)
    save_diffusers(model, tmp_path / "xl")
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "safety_checker" not in index
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "xl"), local_files_only=True)
    assert pipe.config.force_zeros_for_empty_prompt is True and pipe.tokenizer_2.pad_token == "!"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    again = load_model(tmp_path / "xl")
    for name in ("unet", "text_encoder_2", "vae"):
        ours, theirs, back = (getattr(m, name).state_dict() for m in (model, pipe, again))
        assert set(ours) == set(back) and all(torch.equal(v, back[k]) for k, v in ours.items()), name
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items()), name  # checkpoint keys
    assert again.spec.text_encoder_2["projection_dim"] == model.spec.text_encoder_2["projection_dim"]

"""One GPU check, prepared to run unattended in minutes: `python -m benchmarks.gpu` (or tools/gpu_check.sh).

On a machine with an NVIDIA GPU, no network, and whatever subset of torch (CUDA), onnxruntime-gpu and
TensorRT is installed:
  1. probe what is there, and which routes can run; every route that cannot says why;
  2. build an SD 1.5 random-weight engine folder at fp16 (the preset's weights, seed 0, saved once as
     a diffusers folder that the diffusers peers load too), 512 px, one image a batch; cached;
  3. run each available route in its own process (a crash or hang costs that route only):
       parity   every network's outputs against the fp32 reference (route torch-fp32: our PyTorch
                reference engine on CUDA, TF32 off) on the same seeded inputs, max|out - ref| / max|ref|;
                the reference computes in fp32 but takes and returns the fp16 folder's I/O dtypes, so
                its float16 outputs set a floor of about 5e-4 (fp16 rounding) under every parity figure;
       unet     U-Net latency at the guidance batch (2 x 4 x 64 x 64, 77 tokens): median, min, max of
                `--repeats` calls after `--warmup` (engines return host arrays, so each call is synced);
       e2e      txt2img at 512 x 512, `--steps` steps, guidance 7.5: it/s of the denoising loop and the
                end-to-end seconds (diffusers: it/s over the whole call);
  4. write one JSON and one markdown report, rewritten after every route, so a run killed midway
     leaves what it measured.
It starts no route that would end past `--budget-s` (default 420 s, build included; a route still
running 30 s past the budget is stopped), and says which routes that left out. Routes, in the
order they run: torch-fp32, torch-fp16, diffusers-fp16, diffusers-fp16-compile, torch-bf16,
onnxruntime-cuda, onnxruntime-cuda-graph, tensorrt, onnxruntime-tensorrt.

`--allow-cpu` (with `--model tiny-sd1`) runs the torch routes on the CPU to test this plumbing; such a
report says `"device": "cpu"` and claims nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("SDRT_GPU_CACHE", "~/.cache/sd-runtime/gpu-check")).expanduser()
SCHEMA = 1
NETWORKS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
GUIDANCE = 7.5
REFERENCE = "torch-fp32"


@dataclass(frozen=True)
class Route:
    name: str
    kind: str  # "engine" (our runtime) | "peer" (diffusers)
    label: str
    backend: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # runtime.load options (per network)
    needs: tuple[str, ...] = ()  # probe keys that must be true
    dtype: str = "float16"  # peers
    compile: bool = False  # peers
    estimate_s: float = 60.0  # what the route costs on an H200, for the time budget


ROUTES = {r.name: r for r in (
    Route("torch-fp32", "engine", "our PyTorch reference engine, fp32 (the parity reference)", "torch",
          {"*": {"device": "cuda", "dtype": "fp32"}}, ("torch_cuda", "torch_engine"), estimate_s=45),
    # the VAE stays fp32, as the fp16 folder keeps it (SD 1.x's force_upcast)
    Route("torch-fp16", "engine", "our PyTorch reference engine, fp16 (normalizations and VAE fp32, as the graphs)",
          "torch", {"*": {"device": "cuda", "dtype": "fp16"}, "vae_decoder": {"device": "cuda", "dtype": "fp32"},
                    "vae_encoder": {"device": "cuda", "dtype": "fp32"}}, ("torch_cuda", "torch_engine"), estimate_s=40),
    Route("diffusers-fp16", "peer", "diffusers StableDiffusionPipeline fp16 eager", needs=("torch_cuda", "diffusers"),
          estimate_s=40),
    Route("diffusers-fp16-compile", "peer", "diffusers fp16, U-Net torch.compile", needs=("torch_cuda", "diffusers"),
          compile=True, estimate_s=150),
    Route("torch-bf16", "engine", "our PyTorch reference engine, bf16", "torch",
          {"*": {"device": "cuda", "dtype": "bf16"}}, ("torch_cuda", "torch_engine"), estimate_s=40),
    Route("onnxruntime-cuda", "engine", "ONNX Runtime CUDA EP, device IO binding", "onnxruntime",
          {"*": {"providers": ["cuda"]}}, ("ort_cuda",), estimate_s=60),
    Route("onnxruntime-cuda-graph", "engine", "ONNX Runtime CUDA EP, U-Net in a CUDA graph", "onnxruntime",
          {"*": {"providers": ["cuda"]}, "unet": {"providers": ["cuda"], "cuda_graph": True}}, ("ort_cuda",),
          estimate_s=60),
    Route("tensorrt", "engine", "TensorRT plans (strongly typed fp16), U-Net in a CUDA graph", "tensorrt",
          {"unet": {"cuda_graph": True}}, ("tensorrt",), estimate_s=300),
    Route("onnxruntime-tensorrt", "engine", "ONNX Runtime TensorRT EP", "onnxruntime", {}, ("ort_tensorrt",),
          estimate_s=300),
)}


@dataclass
class Settings:
    model: str = "sd15"
    resolution: int = 512
    steps: int = 20
    repeats: int = 10
    warmup: int = 2
    budget_s: float = 420.0
    cache_dir: str = str(DEFAULT_CACHE)
    out_dir: str = str(ROOT / "benchmarks" / "results")
    routes: tuple[str, ...] = tuple(ROUTES)
    allow_cpu: bool = False
    route_timeout_s: float = 420.0


# --- what is installed ------------------------------------------------------------------------------

def probe() -> dict[str, Any]:
    """What this machine has for each route: true/false per capability, with the reason where false."""
    found: dict[str, Any] = {"reasons": {}}
    try:
        import torch

        found["torch"] = torch.__version__
        found["torch_cuda_version"] = torch.version.cuda
        found["torch_cuda"] = torch.cuda.is_available()
        if found["torch_cuda"]:
            found["gpu"] = torch.cuda.get_device_name(0)
            found["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
        else:
            found["reasons"]["torch_cuda"] = (f"torch {torch.__version__} sees no CUDA device (CUDA build: "
                                              f"{torch.version.cuda or 'none, a CPU build'})")
    except ImportError as e:
        found["torch_cuda"] = False
        found["reasons"]["torch_cuda"] = f"torch is not installed ({e})"
    found.update(_probe_diffusers(), **_probe_onnxruntime(), **_probe_tensorrt(), **_probe_project())
    from runtime.engines import cuda

    found["driver"] = cuda.driver_release()
    found["packages"] = cuda.installed()
    return found


def _probe_project() -> dict[str, Any]:
    """The project's own needs: the export packages, and the torch engine's entry point (registered
    by `pip install -e .`; tools/gpu_check.sh does that offline where it is missing)."""
    import importlib.util
    from importlib import metadata

    missing = [m for m in ("onnx", "transformers", "safetensors", "tokenizers", "PIL")
               if importlib.util.find_spec(m) is None]
    registered = any(e.name == "torch" for e in metadata.entry_points(group="sd_runtime.engines"))
    out: dict[str, Any] = {"missing_modules": missing, "torch_engine": registered}
    if not registered:
        out["reasons_torch_engine"] = ("the torch engine's entry point is not registered: pip install --no-deps "
                                       "--no-build-isolation -e . (tools/gpu_check.sh does)")
    return out


def _probe_diffusers() -> dict[str, Any]:
    try:
        import diffusers
    except ImportError as e:
        return {"diffusers": False, "reasons_diffusers": f"diffusers is not installed ({e})"}
    return {"diffusers": True, "diffusers_version": diffusers.__version__}


def _probe_onnxruntime() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        why = f"onnxruntime is not installed ({e})"
        return {"ort_cuda": False, "ort_tensorrt": False, "reasons_ort_cuda": why, "reasons_ort_tensorrt": why}
    have = ort.get_available_providers()
    out: dict[str, Any] = {"onnxruntime": ort.__version__, "ort_providers": have}
    for key, provider in (("ort_cuda", "CUDAExecutionProvider"), ("ort_tensorrt", "TensorrtExecutionProvider")):
        out[key] = provider in have
        if not out[key]:
            out[f"reasons_{key}"] = (f"onnxruntime {ort.__version__} has no {provider} (providers: {', '.join(have)}); "
                                     "it comes with onnxruntime-gpu (pip install 'sd-runtime[gpu-cu12]' or "
                                     "'[ort-tensorrt-cu12]', or the -cu13 sets)")
    return out


def _probe_tensorrt() -> dict[str, Any]:
    from runtime.engines.tensorrt import is_available

    ok, why = is_available()
    return {"tensorrt": ok, **({} if ok else {"reasons_tensorrt": why})}


def route_plan(found: dict[str, Any], settings: Settings) -> dict[str, str | None]:
    """Route -> None when it can run here, else why not."""
    reasons = {**found.get("reasons", {}), **{k[len("reasons_"):]: v for k, v in found.items()
                                               if k.startswith("reasons_")}}
    plan: dict[str, str | None] = {}
    for name in settings.routes:
        route = ROUTES[name]
        needs = route.needs
        if settings.allow_cpu and not route.compile and (route.kind == "peer" or route.backend == "torch"):
            needs = tuple(n for n in needs if n != "torch_cuda")  # plumbing: torch routes on the CPU
        missing = [n for n in needs if not found.get(n)]
        plan[name] = "; ".join(f"{n}: {reasons.get(n, 'not available')}" for n in missing) if missing else None
    return plan


# --- the parent -------------------------------------------------------------------------------------

def run(settings: Settings, log=print) -> dict[str, Any]:
    """Probe, build, run every available route within the budget; write and return the report."""
    start = time.perf_counter()
    found = probe()
    device = "cuda" if found.get("torch_cuda") else "cpu"
    report = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu", *sys.argv[1:]]),
              "device": device, "settings": asdict(settings), "probe": found, "build": None, "routes": {}}
    if device == "cpu" and not settings.allow_cpu:
        report["verdict"] = "no CUDA GPU here: nothing measured (every route skipped)"
        for name, why in route_plan(found, settings).items():
            report["routes"][name] = {"status": "skipped", "reason": why or "no CUDA GPU on this machine"}
        return _write(report, settings, log)
    plan = route_plan(found, settings)
    report["build"] = _child({"kind": "build", "settings": asdict(settings)}, settings,
                             max(settings.budget_s - 60, 60), log)
    _write(report, settings, log)
    for name, why in plan.items():
        left = settings.budget_s - (time.perf_counter() - start)
        if why is not None:
            report["routes"][name] = {"status": "skipped", "reason": why}
        elif report["build"].get("status") != "ok":
            report["routes"][name] = {"status": "skipped", "reason": "the engine folder was not built (see build)"}
        elif left < ROUTES[name].estimate_s:
            report["routes"][name] = {"status": "skipped", "reason": f"time budget: {left:.0f} s left of "
                                      f"{settings.budget_s:.0f} s, the route takes about {ROUTES[name].estimate_s:.0f} s"}
        else:
            log(f"gpu check: {name} ({left:.0f} s left)")
            task = {"kind": "route", "route": name, "settings": asdict(settings), "device": device,
                    "build": report["build"]}
            report["routes"][name] = _child(task, settings, min(settings.route_timeout_s, max(left, 30)), log)
        add_parity(report)
        _write(report, settings, log)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return _write(report, settings, log)


def _child(task: dict[str, Any], settings: Settings, timeout_s: float, log) -> dict[str, Any]:
    """Run one task in a fresh process (`python -m benchmarks.gpu --task`), bounded in time."""
    work = Path(settings.cache_dir) / "tasks"
    work.mkdir(parents=True, exist_ok=True)
    name = task.get("route", task["kind"])
    task_path, result_path = work / f"{name}.task.json", work / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    task_path.write_text(json.dumps(task))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--task", str(task_path), str(result_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout_s:.0f} s"}
    if not result_path.is_file():
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"status": "failed", "reason": f"the process exited with {proc.returncode} and no result: {tail}"}
    result = json.loads(result_path.read_text())
    result["process_s"] = round(time.perf_counter() - t0, 1)
    log(f"gpu check: {name}: {result.get('status')} {result.get('reason', '')}".rstrip())
    return result


def add_parity(report: dict[str, Any]) -> None:
    """Each measured route's outputs against the reference route's, max|out - ref| / max|ref|."""
    from runtime.compare import psnr, rel_err

    ref = report["routes"].get(REFERENCE, {})
    if not ref.get("outputs"):
        return
    reference = np.load(ref["outputs"])
    for result in report["routes"].values():
        if result.get("status") == "ok" and result.get("outputs"):
            got = np.load(result["outputs"])
            result["parity"] = {key: rel_err(got[key], reference[key]) for key in got.files
                                if key in reference.files}
        if result.get("status") == "ok" and result.get("image") and ref.get("image"):
            result["psnr_db"] = psnr(np.load(result["image"]), np.load(ref["image"]))


def _write(report: dict[str, Any], settings: Settings, log) -> dict[str, Any]:
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(report))
    report["files"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
    return report


def report_stem(report: dict[str, Any]) -> str:
    gpu = report["probe"].get("gpu") if report["device"] == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in str(gpu).lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"gpu-check-{report['settings']['model']}-{report['settings']['resolution']}-{slug}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page: the machine, then one row per route."""
    p, s = report["probe"], report["settings"]
    lines = [f"# GPU check: {s['model']} fp16 folder, {s['resolution']} x {s['resolution']}, {s['steps']} steps, "
             f"guidance {GUIDANCE}", "",
             f"- device: {report['device']}" + (f" ({p.get('gpu')}, compute capability {p.get('compute_capability')})"
                                                 if report["device"] == "cuda" else " (plumbing run: no GPU claims)"),
             f"- driver: {p.get('driver')}; torch {p.get('torch')} (CUDA {p.get('torch_cuda_version')}); "
             f"onnxruntime {p.get('onnxruntime')}; packages: {p.get('packages')}",
             f"- created {report['created']}: `{report['command']}`", ""]
    if report.get("verdict"):
        lines += [f"**{report['verdict']}**", ""]
    lines += ["Parity: max|out - ref| / max|ref| against route torch-fp32 (fp32 compute, the fp16 folder's float16 "
              "I/O: about 5e-4 of that is the reference's own fp16 rounding). Image PSNR against torch-fp32's image.",
              ""]
    lines += ["| route | status | U-Net ms: median (min-max) | it/s | end to end s | worst parity vs fp32 | image PSNR "
              "dB | note |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["routes"].items():
        lines.append("| " + " | ".join([name, str(r.get("status"))] + _cells(name, r)) + " |")
    return "\n".join(lines) + "\n"


def _cells(name: str, r: dict[str, Any]) -> list[str]:
    unet, e2e, parity = r.get("unet") or {}, r.get("e2e") or {}, r.get("parity") or {}
    lat = f"{1e3 * unet['median_s']:.1f} ({1e3 * unet['min_s']:.1f}-{1e3 * unet['max_s']:.1f})" if unet else ""
    worst = f"{max(parity.values()):.2e} ({max(parity, key=parity.get)})" if parity else ""
    psnr = f"{r['psnr_db']:.1f}" if isinstance(r.get("psnr_db"), float) else ""
    note = ROUTES[name].label if r.get("status") == "ok" and name in ROUTES else str(r.get("reason", ""))
    return [lat, f"{e2e['it_s']:.2f}" if e2e else "", f"{e2e['total_s']:.2f}" if e2e else "", worst, psnr,
            note.replace("|", "/").replace("\n", " ")]


# --- the child processes ------------------------------------------------------------------------------

def folder_paths(settings: dict[str, Any]) -> tuple[Path, Path]:
    base = Path(settings["cache_dir"]) / settings["model"]
    return base / "diffusers", base / f"engine-fp16-{settings['resolution']}"


def build_task(task: dict[str, Any]) -> dict[str, Any]:
    """The diffusers folder of the preset's random weights (once) and the fp16 engine folder built from it."""
    from export.build import build_engine
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    s = task["settings"]
    diffusers_dir, engine_dir = folder_paths(s)
    t0 = time.perf_counter()
    if not (diffusers_dir / "model_index.json").is_file():
        tmp = diffusers_dir.with_name(diffusers_dir.name + ".partial")
        save_diffusers(random_model(s["model"], seed=0), tmp)
        tmp.replace(diffusers_dir)
    size = s["resolution"]
    build_engine(str(diffusers_dir), engine_dir, precision="fp16", min_image=size, opt_image=size, max_image=size,
                 max_batch=1, progress=lambda line: None)
    return {"engine_dir": str(engine_dir), "diffusers_dir": str(diffusers_dir), "build_s": time.perf_counter() - t0}


def route_task(task: dict[str, Any]) -> dict[str, Any]:
    route = ROUTES[task["route"]]
    out = Path(task["settings"]["cache_dir"]) / "tasks" / route.name
    if route.kind == "peer":
        return peer_route(route, task["settings"], task["build"], out, task["device"])
    return engine_route(route, task["settings"], task["build"], task["device"], out)


def route_options(route: Route, engine_dir: Path, manifest: Any, device: str) -> dict[str, Any]:
    """runtime.load options of an engine route: the route's, on the CPU for a plumbing run, and the
    ones only the folder can give (ORT's TensorRT EP options; the TensorRT plans, built here once)."""
    options = json.loads(json.dumps(route.options))
    if device == "cpu":
        for per_network in options.values():
            if per_network.get("device") == "cuda":
                per_network["device"] = "cpu"
    if route.name == "onnxruntime-tensorrt":
        from runtime.engines.ort_tensorrt import ort_tensorrt_providers

        options = {n: {"providers": ort_tensorrt_providers(engine_dir, manifest, n)} for n in NETWORKS}
    if route.backend == "tensorrt" and "tensorrt" not in manifest.backends:
        from dataclasses import replace

        from export.tensorrt import build_tensorrt_engines
        from runtime.folder.manifest import write_manifest

        entry = build_tensorrt_engines(engine_dir, manifest, precision="fp16", progress=lambda line: None)
        write_manifest(engine_dir, replace(manifest, backends={**manifest.backends, "tensorrt": entry}))
    return options


def network_calls(pipe: Any, dims: Any, settings: dict[str, Any]) -> tuple[dict, dict]:
    """One call per network on the seeded inputs (kept for parity), then the U-Net timed. Engines
    come from `pipe.engine(network)`, which opens the VAE encoder on first use."""
    from benchmarks.timing import measure
    from benchmarks.worker import network_batch, network_feeds

    outputs: dict[str, np.ndarray] = {}
    unet: dict[str, Any] = {}
    for network in NETWORKS:
        feeds = network_feeds(network, dims, network_batch(network, 1, True), settings["resolution"])
        engine = pipe.engine(network)
        for name, value in engine.run(feeds).items():
            outputs[f"{network}/{name}"] = np.asarray(value, np.float32)
        if network == "unet":
            unet = measure(lambda: engine.run(feeds), repeats=settings["repeats"], warmup=settings["warmup"])
    return outputs, unet


def engine_route(route: Route, settings: dict[str, Any], build: dict[str, Any], device: str, out: Path) -> dict:
    import runtime
    from runtime.folder.manifest import load_manifest

    engine_dir = Path(build["engine_dir"])
    manifest = load_manifest(engine_dir)
    options = route_options(route, engine_dir, manifest, device)
    manifest = load_manifest(engine_dir)
    t0 = time.perf_counter()
    with runtime.load(engine_dir, backend=route.backend, options=options) as pipe:
        load_s = time.perf_counter() - t0
        outputs, unet = network_calls(pipe, manifest.dims, settings)
        e2e, image = txt2img_ours(pipe, settings)
        engines = {n: asdict(pipe.engine(n).info) for n in NETWORKS}
    np.savez(out.with_suffix(".npz"), **outputs)
    np.save(out.with_suffix(".image.npy"), image)
    return {"status": "ok", "label": route.label, "device": device, "load_s": load_s, "unet": unet, "e2e": e2e,
            "engines": engines, "outputs": str(out.with_suffix(".npz")), "image": str(out.with_suffix(".image.npy"))}


def txt2img_ours(pipe: Any, settings: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    from benchmarks.worker import PROMPT

    res, steps = settings["resolution"], settings["steps"]

    def call(n: int):
        return pipe.txt2img(PROMPT, negative_prompt="", height=res, width=res, num_inference_steps=n,
                            guidance_scale=GUIDANCE, seed=0, output_type="np", progress=False)

    call(2)  # warm-up: every shape the timed run uses
    t0 = time.perf_counter()
    result = call(steps)
    total = time.perf_counter() - t0
    denoise = result.timings["denoise"]
    return {"it_s": steps / denoise, "denoise_s": denoise, "total_s": total, "steps": steps,
            "timings": dict(result.timings)}, np.asarray(result.images, np.float32)


def peer_route(route: Route, settings: dict[str, Any], build: dict[str, Any], out: Path,
               device: str = "cuda") -> dict[str, Any]:
    """diffusers fp16 on CUDA over the same weights: U-Net output and latency, txt2img it/s (on the
    CPU, for a plumbing run, in float32)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from benchmarks.timing import measure
    from benchmarks.worker import PROMPT, network_feeds
    from runtime.folder.manifest import load_manifest

    dtype = getattr(torch, route.dtype) if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    pipe = StableDiffusionPipeline.from_pretrained(build["diffusers_dir"], torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    if route.compile:
        pipe.unet = torch.compile(pipe.unet)
    feeds = {k: torch.from_numpy(v).to(device, dtype) for k, v in
             network_feeds("unet", load_manifest(build["engine_dir"]).dims, 2, settings["resolution"]).items()}
    # called as StableDiffusionPipeline calls it (a 0-dim integer timestep, the same keywords), so that a
    # compiled U-Net is not compiled again for the pipeline's calls; 500 is network_feeds' timestep
    step = torch.tensor(500, device=device)

    def unet_call():
        with torch.inference_mode():
            y = pipe.unet(feeds["sample"], step, encoder_hidden_states=feeds["encoder_hidden_states"],
                          timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False)[0]
        sync()
        return y

    noise = unet_call().float().cpu().numpy()
    unet = measure(unet_call, repeats=settings["repeats"], warmup=settings["warmup"])
    res, steps, marks = settings["resolution"], settings["steps"], []

    def call(n: int):
        marks.clear()
        with torch.inference_mode():
            pipe(PROMPT, negative_prompt="", height=res, width=res, num_inference_steps=n, guidance_scale=GUIDANCE,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="np",
                 callback_on_step_end=lambda p, i, t, kw: (sync(), marks.append(time.perf_counter()), kw)[2])
        sync()

    call(2)
    t0 = time.perf_counter()
    call(steps)
    total = time.perf_counter() - t0
    np.savez(out.with_suffix(".npz"), **{"unet/noise_pred": noise})
    e2e = {"it_s": (steps - 1) / (marks[-1] - marks[0]), "total_s": total, "steps": steps,
           "it_s_note": "steps 2..N between step-end callbacks"}
    return {"status": "ok", "label": route.label, "device": device, "dtype": str(dtype), "unet": unet, "e2e": e2e,
            "outputs": str(out.with_suffix(".npz")), "torch": torch.__version__}


def run_task(task_path: str, result_path: str) -> int:
    task = json.loads(Path(task_path).read_text())
    try:
        result = build_task(task) if task["kind"] == "build" else route_task(task)
        result.setdefault("status", "ok")
    except Exception as e:  # reported to the parent, which records the route as failed
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    Path(result_path).write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["status"] == "ok" else 1


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", help="random-weight preset (sd15; tiny-sd1 for a plumbing run)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no route that would end past this")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--routes", nargs="+", choices=tuple(ROUTES), default=tuple(ROUTES))
    p.add_argument("--allow-cpu", action="store_true", help="run the torch routes on the CPU (plumbing test)")
    a = p.parse_args(argv)
    return Settings(model=a.model, resolution=a.resolution, steps=a.steps, repeats=a.repeats, warmup=a.warmup,
                    budget_s=a.budget_s, cache_dir=a.cache_dir, out_dir=a.out_dir, routes=tuple(a.routes),
                    allow_cpu=a.allow_cpu)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--task"]:
        return run_task(argv[1], argv[2])
    report = run(parse_args(argv), log=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(report["files"]))
    return 1 if any(r.get("status") == "failed" for r in report["routes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Full-size SDXL on a CPU (issue 26, "Must show"): `python -m benchmarks sdxl`.

    python -m benchmarks sdxl [--model sdxl|tiny-sdxl] [--resolution 512 1024] [--steps 20] [--turbo-steps 4]
                              [--repeats 3] [--warmup 1] [--targets ours diffusers-fp32 optimum genai]
                              [--scenarios NAME ...] [--cache-dir DIR] [--optimum-python PATH]
                              [--genai-python PATH] [--timeout S] [--out PATH.json]

Weights: export/configs.py's preset (random, seed 0) written once as a diffusers folder by a
"prepare" worker; the engine folder built from it by a "build" worker (export.build.build_engine,
fp32 graph, image bounds the benchmarked sizes, batch 1; idempotent), whose process is the build:
its time and peak RSS (VmHWM, benchmarks/timing.peak_rss_mb) are the build's, recorded beside the
folder the first time and reported from that record when the folder is reused. optimum's OpenVINO
IR (the optimum and genai peers) is exported from the same diffusers folder, in optimum's venv,
with 8-bit weight compression off (optimum's default compresses a model over 1 B parameters, the
SDXL U-Net, to int8 weights: a different precision). Everything lives under --cache-dir; the disk
it needs is checked first (full size: ~14 GB diffusers + ~18 GB engine with its compile-cache bound
+ ~14 GB optimum IR), and each folder's size is reported.

Scenarios (names as --scenarios takes them), each run for every target in a worker process of its
own (peak RSS: that process's VmHWM), one at a time:
  unet-R          one U-Net call at R x R, batch 2 (guided: [uncond, cond]), 77 tokens, timestep 500:
                  median of --repeats after --warmup untimed calls; the first call timed apart
  turbo-S-R       txt2img at the smallest R, S steps (--turbo-steps), guidance 0, Euler with trailing
                  timesteps (SDXL-Turbo's scheduler settings)
  guided-N-R      txt2img at each R, N steps (--steps), guidance 5.0 (StableDiffusionXLPipeline's
                  default), Euler over the folder's schedule: --repeats timed runs at the smallest R,
                  one image at the larger sizes
End to end: --warmup untimed 2-step runs (compile every shape), then the timed runs (benchmarks/
protocol.py time_e2e); every target starts from the same latents (the noise our pipeline draws for
the seed) and its image's PSNR against diffusers fp32's is reported.

Targets: ours (runtime.load(..., backend="openvino"), OpenVINO's default precision: bf16 where the
CPU has it, f32 elsewhere; the row names it), ours-f32, ours-int8w (the same folder with
`build-engine --quantize int8-weights` added in place by a "quantize" worker, timed and measured like
the build: the U-Net's and text encoders' weights in int8, activations at the default precision; its
rows' precision reads "<precision>+int8w", so no peer is its like); diffusers-fp32 (StableDiffusionXLPipeline,
PyTorch fp32 eager); optimum (optimum-intel OVStableDiffusionXLPipeline, static reshape) and genai
(openvino.genai Text2ImagePipeline on optimum's IR), both at OpenVINO's default precision, and their
-f32 variants. A target that cannot run here (no venv, not enough disk, killed for memory) is a row
with its reason and error text. The report states the issue's goals from the run's own ratios.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine as mach
from benchmarks import peers
from benchmarks.fewstep import _goal, goal_lines  # one pass / fail record (and table) for every benchmark's goals
from benchmarks.fewstep import add_peer_args, machine_line, peer_python, report_head, write_report
from benchmarks.suite import DEFAULT_CACHE, RESULTS_DIR, _run_worker
from benchmarks.worker import PROMPT
from runtime.engines.ov_cache import DEFAULT_FRACTION as OV_CACHE_FRACTION  # the compile cache's bound

SCHEMA = "sdxl-1"
WORKER = "benchmarks.sdxl_worker"
MODELS = ("sdxl", "tiny-sdxl")
GUIDANCE_SCALE = 5.0  # diffusers 0.42 StableDiffusionXLPipeline.__call__ default guidance_scale
REFERENCE = "diffusers-fp32"  # the image every other target's PSNR is measured against
GOAL_SPEEDUP = 1.2  # issue 26: end to end >= 1.2x the fastest peer at the same precision
PEER_KINDS = ("diffusers", "optimum", "genai")
GB = 1e9
# Disk per folder (bytes), checked before anything is written. sdxl: the fp32 weights of
# stabilityai/stable-diffusion-xl-base-1.0 (unet 10.3 GB, text_encoder_2 2.78 GB, text_encoder 0.49 GB,
# vae 0.33 GB safetensors): the diffusers folder, the ONNX graphs of the engine folder and optimum's
# uncompressed IR each hold them once. tiny-sdxl: a few MB, bounded generously.
WEIGHTS_BYTES = {"sdxl": 13.9 * GB, "tiny-sdxl": 0.05 * GB}


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "unet" | "e2e"
    resolution: int
    steps: int = 0
    guidance_scale: float = 0.0
    spacing: str | None = None  # a timestep spacing replacing the folder's ("trailing": Turbo-style)
    repeats: int = 1
    label: str = ""


@dataclass(frozen=True)
class SdxlTarget:
    name: str
    kind: str  # "ours" | "diffusers" | "optimum" | "genai"
    label: str
    precision: str  # "default" (OpenVINO's CPU choice: bf16 where the CPU has it, else f32) | "f32"
    quantization: str | None = None  # ours: the folder's build-engine --quantize scheme it runs (None: the graphs)


TARGETS = {
    "ours": SdxlTarget("ours", "ours", "ours, OpenVINO, default precision", "default"),
    "ours-f32": SdxlTarget("ours-f32", "ours", "ours, OpenVINO f32", "f32"),
    "ours-int8w": SdxlTarget("ours-int8w", "ours", "ours, OpenVINO, default precision, int8 weights (U-Net and text "
                             "encoders: build-engine --quantize int8-weights)", "default", "int8-weights"),
    "diffusers-fp32": SdxlTarget("diffusers-fp32", "diffusers", "diffusers StableDiffusionXLPipeline, PyTorch fp32 eager",
                                 "f32"),
    "optimum": SdxlTarget("optimum", "optimum", "optimum-intel OVStableDiffusionXLPipeline, static reshape, "
                          "default precision", "default"),
    "optimum-f32": SdxlTarget("optimum-f32", "optimum", "optimum-intel OVStableDiffusionXLPipeline, static reshape, f32",
                              "f32"),
    "genai": SdxlTarget("genai", "genai", "openvino.genai Text2ImagePipeline, static reshape, default precision",
                        "default"),
    "genai-f32": SdxlTarget("genai-f32", "genai", "openvino.genai Text2ImagePipeline, static reshape, f32", "f32"),
}
DEFAULT_TARGETS = ("ours", "diffusers-fp32", "optimum", "genai")


@dataclass
class SdxlSettings:
    model: str = "sdxl"
    resolutions: tuple[int, ...] = (512, 1024)
    steps: int = 20
    turbo_steps: int = 4
    guidance_scale: float = GUIDANCE_SCALE
    repeats: int = 3
    warmup: int = 1
    targets: tuple[str, ...] = DEFAULT_TARGETS
    scenarios: tuple[str, ...] = ()  # empty: every scenario
    seed: int = 0
    weights_seed: int = 0
    cache_dir: str = str(DEFAULT_CACHE)
    timeout_s: float = 4 * 3600.0
    peer_python: dict[str, str] = field(default_factory=dict)


class DiskError(RuntimeError):
    """Not enough free disk under the cache for the folders this run must write."""


def all_scenarios(s: SdxlSettings) -> list[Scenario]:
    """Every scenario of the settings, in run order (see the module docstring)."""
    small = min(s.resolutions)
    out = [Scenario(f"unet-{r}", "unet", r, guidance_scale=s.guidance_scale, repeats=s.repeats,
                    label=f"U-Net call, {r}x{r}, batch 2 (guided)") for r in s.resolutions]
    out.append(Scenario(f"turbo-{s.turbo_steps}-{small}", "e2e", small, s.turbo_steps, 0.0, "trailing", s.repeats,
                        f"{s.turbo_steps} steps Turbo-style (guidance 0, Euler trailing), {small}x{small}"))
    out += [Scenario(f"guided-{s.steps}-{r}", "e2e", r, s.steps, s.guidance_scale, None, s.repeats if r == small else 1,
                     f"{s.steps} steps guided (Euler, guidance {s.guidance_scale:g}), {r}x{r}") for r in s.resolutions]
    return out


def scenarios(s: SdxlSettings) -> list[Scenario]:
    """The scenarios this run measures (--scenarios picks by name)."""
    every = all_scenarios(s)
    unknown = sorted(set(s.scenarios) - {sc.name for sc in every})
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; this run's are {', '.join(sc.name for sc in every)}")
    return [sc for sc in every if not s.scenarios or sc.name in s.scenarios]


# ------------------------------------------------------------------------------------------ paths, disk


def cache_root(s: SdxlSettings) -> Path:
    return Path(s.cache_dir) / f"sdxl-bench-{s.model}-seed{s.weights_seed}"


def paths(s: SdxlSettings) -> dict[str, Path]:
    root = cache_root(s)
    return {"diffusers": root / "diffusers", "engine": root / "engine", "optimum": root / "optimum",
            "optimum_turbo": root / "optimum-turbo", "build_record": root / "build-record.json",
            "quantize_record": root / "quantize-record.json"}


def folder_bytes(path: Path) -> int:
    """Bytes a folder holds on disk, each hard-linked file counted once (optimum-turbo links optimum's)."""
    seen, total = set(), 0
    for f in path.rglob("*") if path.is_dir() else ():
        st = f.lstat()
        if f.is_file() and not f.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def disk_needs(s: SdxlSettings, optimum: bool) -> dict[str, float]:
    """Bytes still to be written per folder: the ones that exist already need nothing."""
    p, weights = paths(s), WEIGHTS_BYTES[s.model]
    needs = {"diffusers": 0.0 if (p["diffusers"] / "model_index.json").is_file() else weights,
             "engine": 0.0 if (p["engine"] / "manifest.json").is_file() else weights * (1 + OV_CACHE_FRACTION)}
    if optimum:
        needs["optimum"] = 0.0 if (p["optimum"] / "model_index.json").is_file() else weights
    return needs


def check_disk(needs: dict[str, float], free: float, where: Path) -> str | None:
    """None when the project's folders fit in `free` bytes, else DiskError's message; optimum's
    folder is judged apart (optimum_disk_problem): without it only the optimum and genai rows fail."""
    project = needs.get("diffusers", 0.0) + needs.get("engine", 0.0)
    if project <= free:
        return None
    return (f"not enough disk under {where}: this run writes ~{needs.get('diffusers', 0) / GB:.1f} GB of diffusers "
            f"weights and ~{needs.get('engine', 0) / GB:.1f} GB of engine folder (graphs and their OpenVINO compile "
            f"cache), {project / GB:.1f} GB in all, and {free / GB:.1f} GB are free. Free some space or pass "
            "--cache-dir on a larger disk")


def optimum_disk_problem(needs: dict[str, float], free: float, where: Path) -> str | None:
    """Why optimum's IR cannot be exported for lack of disk (after the project's folders), or None."""
    left = free - needs.get("diffusers", 0.0) - needs.get("engine", 0.0)
    want = needs.get("optimum", 0.0)
    if want <= left:
        return None
    return (f"not enough disk for optimum's OpenVINO export under {where}: it needs ~{want / GB:.1f} GB and "
            f"{max(left, 0) / GB:.1f} GB are left after the project's folders")


# ------------------------------------------------------------------------------------------ prepare


def availability(t: SdxlTarget, s: SdxlSettings) -> tuple[bool, str]:
    """(True, "") or (False, why `t` cannot run here), without importing any framework here."""
    import importlib.util

    if t.kind in ("optimum", "genai"):
        return peers.availability(t.kind, s.peer_python.get(t.kind))
    wanted = ("openvino", "runtime") if t.kind == "ours" else ("torch", "diffusers")
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    return (False, f"{', '.join(missing)} not installed") if missing else (True, "")


def quantization(s: SdxlSettings) -> str | None:
    """The --quantize scheme a chosen target runs (the build adds it to the engine folder), or None."""
    schemes = {TARGETS[n].quantization for n in s.targets} - {None}
    return schemes.pop() if schemes else None


def build_options(s: SdxlSettings) -> dict[str, Any]:
    """build_engine keywords: an fp32 graph covering the benchmarked sizes at batch 1 (guidance doubles
    the U-Net's batch inside), the export's parity check at the smallest size."""
    return {"precision": "fp32", "min_image": min(s.resolutions), "opt_image": min(s.resolutions),
            "max_image": max(s.resolutions), "max_batch": 1, "seed": s.weights_seed}


def prepare(s: SdxlSettings, workdir: Path, optimum: bool, log) -> dict[str, Any]:
    """The diffusers folder and the engine folder (each in a worker process of its own, so the build's
    peak RSS is the build's), then optimum's IR where an optimum-venv target runs. Raises DiskError
    or RuntimeError when the project's folders cannot be made."""
    p = paths(s)
    p["diffusers"].parent.mkdir(parents=True, exist_ok=True)
    needs, free = disk_needs(s, optimum), shutil.disk_usage(p["diffusers"].parent).free
    problem = check_disk(needs, free, p["diffusers"].parent)
    if problem:
        raise DiskError(problem)
    out: dict[str, Any] = {"disk_free_gb": free / GB, "disk_needed_gb": {k: v / GB for k, v in needs.items()}}
    log(f"preparing {s.model} under {p['diffusers'].parent} (made once, then reused)")
    common = {"worker_module": WORKER, "model": s.model, "weights_seed": s.weights_seed,
              "diffusers_dir": str(p["diffusers"]), "engine_dir": str(p["engine"])}
    for kind in ("prepare", "build"):
        task = {**common, "kind": kind, "target": f"sdxl-{kind}", "build_options": build_options(s),
                "record_path": str(p["build_record"])}
        out[kind] = _run_worker(task, workdir, s.timeout_s)
        if out[kind]["status"] != "ok":
            raise RuntimeError(f"{kind} failed: {out[kind].get('reason')}\n{out[kind].get('traceback', '')}")
    scheme = quantization(s)
    if scheme:  # its own process, so its time and peak RSS are its own; a failure fails its rows only
        log(f"adding --quantize {scheme} to {p['engine']} (once)")
        task = {**common, "kind": "build", "target": f"sdxl-{scheme}", "build_options": build_options(s),
                "quantize": scheme, "record_path": str(p["quantize_record"])}
        out["quantize"] = _run_worker(task, workdir, s.timeout_s)
    if optimum:
        out["optimum"] = prepare_optimum(s, workdir, needs, free, log)
    return out


def prepare_optimum(s: SdxlSettings, workdir: Path, needs: dict[str, float], free: float, log) -> dict[str, Any]:
    """optimum's IR of the diffusers folder and its Turbo-style view (optimum venv), or why not."""
    p = paths(s)
    problem = optimum_disk_problem(needs, free, p["optimum"].parent)
    if problem:
        return {"status": "failed", "reason": problem}
    log(f"optimum: exporting {p['diffusers']} to OpenVINO IR in {p['optimum']} (once)")
    task = {"kind": "sdxl_prepare", "target": "optimum-sdxl-prepare", "diffusers_dir": str(p["diffusers"]),
            "ov_dir": str(p["optimum"]), "ov_turbo_dir": str(p["optimum_turbo"]),
            "worker_python": str(peers.interpreter("optimum", s.peer_python.get("optimum"))),
            "worker_module": peers.runner("optimum").module}
    return _run_worker(task, workdir, s.timeout_s)


def write_inputs(s: SdxlSettings, workdir: Path) -> None:
    """Per resolution: the latents every target starts from (drawn as our pipeline draws a seed's:
    np.random.Generator(PCG64(seed)), runtime/stages.py) and the U-Net's seeded feeds at batch 2
    (benchmarks/worker.py network_feeds, shapes from the engine folder's contract)."""
    from benchmarks.worker import network_feeds
    from runtime.folder.manifest import load_manifest

    dims = load_manifest(paths(s)["engine"]).dims
    for r in s.resolutions:
        lh = r // dims.vae_scale_factor
        noise = np.random.Generator(np.random.PCG64(s.seed)).standard_normal((1, dims.latent_channels, lh, lh),
                                                                            dtype=np.float32)
        np.save(workdir / f"latents-{r}.npy", noise)
        np.savez(workdir / f"feeds-{r}.npz", **network_feeds("unet", dims, 2, r, s.seed))


# ------------------------------------------------------------------------------------------ runs


def target_task(t: SdxlTarget, sc: Scenario, s: SdxlSettings, workdir: Path) -> dict[str, Any]:
    """The worker task of target `t` in scenario `sc`."""
    p, key = paths(s), f"{sc.name}.{t.name}"
    task = {"kind": t.kind, "target": key, "scenario": asdict(sc), "precision": t.precision, "prompt": PROMPT,
            "resolution": sc.resolution, "steps": sc.steps, "guidance_scale": sc.guidance_scale, "seed": s.seed,
            "repeats": sc.repeats, "warmup": s.warmup, "e2e_repeats": sc.repeats, "e2e_warmup": s.warmup,
            "latents_path": str(workdir / f"latents-{sc.resolution}.npy"),
            "feeds_path": str(workdir / f"feeds-{sc.resolution}.npz"),
            "image_path": str(workdir / f"{key}.image.npy") if sc.kind == "e2e" else None,
            "engine_dir": str(p["engine"]), "diffusers_dir": str(p["diffusers"]), "worker_module": WORKER,
            "quantized": t.quantization is not None}
    if t.kind in ("optimum", "genai"):
        turbo = sc.spacing == "trailing"
        task.update(kind="sdxl", scenario_kind="sdxl", ov_dir=str(p["optimum_turbo" if turbo else "optimum"]),
                    worker_python=str(peers.interpreter(t.kind, s.peer_python.get(t.kind))),
                    worker_module=peers.runner(t.kind).module)
    return task


def run_all(s: SdxlSettings, workdir: Path, log) -> tuple[dict[str, Any], dict[str, Any]]:
    """(prepare results, rows keyed SCENARIO/TARGET): one worker process per row, one at a time."""
    chosen = scenarios(s)
    ready = {name: availability(TARGETS[name], s) for name in s.targets}
    optimum = any(ok and TARGETS[n].kind in ("optimum", "genai") for n, (ok, _) in ready.items())
    prepared = prepare(s, workdir, optimum, log)
    write_inputs(s, workdir)
    rows: dict[str, Any] = {}
    for sc in chosen:
        for name in s.targets:
            t, key = TARGETS[name], f"{sc.name}/{name}"
            why = ready[name][1] or _prepare_failure(prepared, t)
            if why:
                rows[key] = {"status": "skipped" if not ready[name][0] else "failed", "reason": why}
            else:
                log(f"{key}: running")
                rows[key] = _run_worker(target_task(t, sc, s, workdir), workdir, s.timeout_s)
            rows[key].update(label=t.label, precision=rows[key].get("precision") or t.precision)
            log(f"{key}: {describe(rows[key])}")
        image_psnr(workdir, rows, sc)
    return prepared, rows


def _prepare_failure(prepared: dict[str, Any], t: SdxlTarget) -> str | None:
    if t.quantization is not None:
        r = prepared.get("quantize", {})
        return None if r.get("status") == "ok" else f"--quantize {t.quantization}: {r.get('reason')}"
    if t.kind not in ("optimum", "genai"):
        return None
    r = prepared.get("optimum", {})
    return None if r.get("status") == "ok" else f"optimum's export: {r.get('reason')}"


def describe(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')} ({row.get('reason')})"
    stats = row.get("unet") or row.get("e2e") or {}
    return f"{stats.get('median_s', float('nan')):.2f} s, peak RSS {row.get('peak_rss_mb', 0):.0f} MiB"


def image_psnr(workdir: Path, rows: dict[str, Any], sc: Scenario) -> None:
    """Each target's image PSNR (dB, runtime.compare.psnr) against diffusers fp32's, same latents."""
    from runtime.compare import psnr

    ref = workdir / f"{sc.name}.{REFERENCE}.image.npy"
    if sc.kind != "e2e" or not ref.is_file():
        return
    a = np.load(ref)
    for key, row in rows.items():
        name = key.split("/")[1]
        path = workdir / f"{sc.name}.{name}.image.npy"
        if key.startswith(f"{sc.name}/") and name != REFERENCE and row.get("status") == "ok" and path.is_file():
            b = np.load(path)
            row["e2e"]["psnr_vs_reference_db"] = psnr(b, a) if b.shape == a.shape else None


def disk_report(s: SdxlSettings) -> dict[str, Any]:
    """Bytes of each folder under the cache, the engine's OpenVINO compile cache apart."""
    p = paths(s)
    out = {name: {"path": str(p[name]), "bytes": folder_bytes(p[name])}
           for name in ("diffusers", "engine", "optimum", "optimum_turbo") if p[name].is_dir()}
    cache = p["engine"] / "openvino-cache"
    if cache.is_dir():
        out["engine"]["openvino_cache_bytes"] = folder_bytes(cache)
    if "optimum_turbo" in out:
        out["optimum_turbo"]["note"] = "hard links to optimum's files but its scheduler"
    return out


# ----------------------------------------------------------------------------------------- goals


def _e2e(rows: dict[str, Any], key: str) -> float | None:
    r = rows.get(key, {})
    return r["e2e"]["median_s"] if r.get("status") == "ok" and r.get("e2e") else None


def goals(rows: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    """Issue 26's goals from this run's own figures, per scenario in `names`: each of our rows end to
    end >= 1.2x the fastest peer of the same precision (the precision each row ran at), and our peak
    RSS <= diffusers fp32's. pass None: not measured in this run."""
    out = []
    for sc in names:
        here = {key.split("/")[1]: r for key, r in rows.items() if key.startswith(f"{sc}/")}
        for name in (n for n in here if TARGETS[n].kind == "ours" and here[n].get("status") == "ok"):
            mine, precision = _e2e(rows, f"{sc}/{name}"), here[name]["precision"]
            if mine is not None:
                timed = {n: _e2e(rows, f"{sc}/{n}") for n, r in here.items()
                         if TARGETS[n].kind in PEER_KINDS and r.get("precision") == precision}
                timed = {n: v for n, v in timed.items() if v}
                best = min(timed.items(), key=lambda kv: kv[1]) if timed else None
                out.append(_goal(f"{sc}: {name} ({precision}) end to end >= {GOAL_SPEEDUP}x the fastest {precision} peer",
                                 best[1] / mine if best else None, GOAL_SPEEDUP, True,
                                 f"{name} {mine:.2f} s vs {best[0]} {best[1]:.2f} s" if best
                                 else f"no {precision} peer measured"))
            ref = here.get(REFERENCE, {})
            if ref.get("status") == "ok":
                out.append(_goal(f"{sc}: {name} peak RSS <= diffusers fp32's", here[name]["peak_rss_mb"] /
                                 ref["peak_rss_mb"], 1.0, False,
                                 f"{here[name]['peak_rss_mb']:.0f} MiB vs {ref['peak_rss_mb']:.0f} MiB"))
    return out


# ---------------------------------------------------------------------------------------- report


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _text(value: Any, limit: int) -> str:
    """An error text on one table cell: whitespace runs as one space, no "|", at most `limit` characters."""
    return " ".join(str(value).split())[:limit].replace("|", "/")


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"# SDXL on a CPU ({report['created']})", "", machine_line(report),
             f"Model: {s['model']} (random weights, seed {s['weights_seed']}); {s['repeats']} timed runs after "
             f"{s['warmup']} untimed (one image at the larger sizes); seconds.", "",
             *_build_lines(report), *_disk_lines(report)]
    for sc in report["scenarios"]:
        lines += [f"## {sc['label']} (`{sc['name']}`)", "",
                  "| target | precision | median s (min-max) | CPU s | first call / load s | peak RSS MiB "
                  "| image PSNR vs diffusers fp32 dB |", "|---|---|---|---|---|---|---|"]
        for key, r in report["results"].items():
            if key.startswith(f"{sc['name']}/"):
                lines.append(_row(key.split("/")[1], r))
        lines.append("")
    lines += goal_lines("## Goals (issue 26), from this run's figures", report["goals"])
    return "\n".join(lines) + "\n"


def _row(name: str, r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"| {name} | {r.get('precision', '')} | {r.get('status')}: {_text(r.get('reason'), 300)} | | | | |"
    st = r.get("unet") or r["e2e"]
    first = st.get("first_call_s") if "unet" in r else r.get("load_s")
    return (f"| {name} | {r['precision']} | {_s(st['median_s'])} ({_s(st['min_s'])}-{_s(st['max_s'])}) "
            f"| {_s(st.get('cpu_median_s'))} | {_s(first)} | {r['peak_rss_mb']:.0f} "
            f"| {_s(st.get('psnr_vs_reference_db'), 1)} |")


def _build_lines(report: dict[str, Any]) -> list[str]:
    prep = report.get("prepare", {})
    build = prep.get("build", {}).get("build", {})
    rec = build.get("record") or {}
    opt = prep.get("optimum")
    made = prep.get("prepare", {})
    made_s = made.get("prepare", {}).get("diffusers_s")
    lines = ["## Build", "", "| step | seconds | peak RSS MiB | note |", "|---|---|---|---|",
             f"| diffusers folder (random weights) | {_s(made_s, 1)} | {_s(made.get('peak_rss_mb'), 0)} "
             f"| {'reused' if made_s == 0.0 else ''} |",
             f"| build-engine (fp32 graphs) | {_s(rec.get('build_s'), 1)} | {_s(rec.get('peak_rss_mb'), 0)} "
             f"| {'reused; figures recorded at ' + str(rec.get('created')) if build.get('reused') and rec else ''}"
             f"{'reused; ' + str(build.get('note')) if build.get('reused') and not rec else ''} |"]
    quant = prep.get("quantize")
    if quant is not None:
        q = quant.get("build", {})
        qrec = q.get("record") or {}
        lines.append(f"| build-engine --quantize {qrec.get('options', {}).get('quantize', '')} (in place) "
                     f"| {_s(qrec.get('build_s'), 1)} | {_s(qrec.get('peak_rss_mb'), 0)} | {quant.get('status')}"
                     f"{'; reused, figures recorded at ' + str(qrec.get('created')) if q.get('reused') and qrec else ''}"
                     f"{': ' + _text(quant.get('reason'), 300) if quant.get('status') != 'ok' else ''} |")
    if opt is not None:
        info = opt.get("prepare", {})
        lines.append(f"| optimum export (fp32 IR) | {_s(info.get('export_s'), 1)} | {_s(opt.get('peak_rss_mb'), 0)} "
                     f"| {opt.get('status')}{'; reused' if info.get('reused') else ''}"
                     f"{': ' + _text(opt.get('reason'), 300) if opt.get('status') != 'ok' else ''} |")
    return lines + [""]


def _disk_lines(report: dict[str, Any]) -> list[str]:
    lines = ["## Disk", "", "| folder | GB | path |", "|---|---|---|"]
    for name, d in report.get("disk", {}).items():
        extra = f" (OpenVINO compile cache {d['openvino_cache_bytes'] / GB:.2f})" if "openvino_cache_bytes" in d else ""
        lines.append(f"| {name} | {d['bytes'] / GB:.2f}{extra} | {d['path']} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> tuple[SdxlSettings, Path | None]:
    p = argparse.ArgumentParser(prog="python -m benchmarks sdxl", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="sdxl",
                   help="export/configs.py preset (tiny-sdxl: the test preset, for a quick check of the plumbing)")
    p.add_argument("--resolution", type=int, nargs="+", default=[512, 1024], help="image sizes (default 512 1024)")
    p.add_argument("--steps", type=int, default=20, help="steps of the guided images (default 20)")
    p.add_argument("--turbo-steps", type=int, default=4, help="steps of the Turbo-style image (default 4)")
    p.add_argument("--guidance", type=float, default=GUIDANCE_SCALE, help=f"guided images' scale (default {GUIDANCE_SCALE})")
    p.add_argument("--repeats", type=int, default=3, help="timed U-Net calls / images at the smallest size (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls / 2-step images first (default 1)")
    p.add_argument("--targets", nargs="+", choices=tuple(TARGETS), default=list(DEFAULT_TARGETS))
    p.add_argument("--scenarios", nargs="+", default=[], metavar="NAME", help="only these (e.g. unet-512 turbo-4-512)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="folders made once and reused")
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds allowed per worker process")
    add_peer_args(p, "sdxl-<model>-<date>")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0 or a.steps < 1 or a.turbo_steps < 1 or any(r < 8 or r % 8 for r in a.resolution):
        p.error("--repeats, --steps and --turbo-steps must be >= 1, --warmup >= 0, each --resolution a multiple of 8")
    s = SdxlSettings(model=a.model, resolutions=tuple(sorted(set(a.resolution))), steps=a.steps,
                     turbo_steps=a.turbo_steps, guidance_scale=a.guidance, repeats=a.repeats, warmup=a.warmup,
                     targets=tuple(dict.fromkeys(a.targets)), scenarios=tuple(a.scenarios), cache_dir=a.cache_dir,
                     timeout_s=a.timeout, peer_python=peer_python(a))
    try:
        scenarios(s)
    except ValueError as e:
        p.error(str(e))
    return s, a.out


def run(s: SdxlSettings, out: Path | None = None, command: str | None = None, log=None) -> dict[str, Any]:
    """Run the benchmark; write the JSON report to `out` and its markdown beside it; return it."""
    log = log or (lambda msg: print(f"[sdxl] {msg}", file=sys.stderr, flush=True))
    started = datetime.now(timezone.utc)
    out = out or RESULTS_DIR / f"sdxl-{s.model}-{started:%Y%m%d-%H%M}.json"
    report = {**report_head(SCHEMA, command, started, s), "scenarios": [asdict(sc) for sc in scenarios(s)]}
    with tempfile.TemporaryDirectory(prefix="sd-sdxl-") as tmp:
        report["prepare"], report["results"] = run_all(s, Path(tmp), log)
    report["disk"] = disk_report(s)
    report["load_average_end"] = mach.load_average()
    report["goals"] = goals(report["results"], [sc["name"] for sc in report["scenarios"] if sc["kind"] == "e2e"])
    return write_report(report, out, render_markdown, log)


def main(argv: list[str]) -> int:
    s, out = parse_args(argv)
    try:
        report = run(s, out, command=" ".join(["python -m benchmarks sdxl", *argv]))
    except DiskError as e:
        print(f"python -m benchmarks sdxl: {e}", file=sys.stderr)
        return 2
    print(render_markdown(report))
    return 1 if any(r.get("status") == "failed" for r in report["results"].values()) else 0


"""Few-step images on a CPU (issue 25): `python -m benchmarks --fewstep`.

    python -m benchmarks --fewstep [--scenarios turbo-1 lcm-4] [--vaes full tiny] [--targets ...]
                                   [--resolution 512] [--repeats 3] [--warmup 1] [--cache-dir DIR]
                                   [--optimum-python PATH] [--genai-python PATH] [--timeout S]
                                   [--prepare-timeout S] [--out PATH.json]

Full-size SD 1.5 architecture, random weights (benchmarks/fewstep_folders.py), at 512x512, batch 1:
  turbo-1  1 step, guidance 0 (Turbo-style: EulerDiscreteScheduler, trailing timesteps)
  lcm-4    4 steps of an LCM-distilled U-Net (time_cond_proj_dim 256, LCMScheduler), guidance 8
           (an embedding input, one U-Net batch)
each with the full VAE (AutoencoderKL) and with the tiny one (AutoencoderTiny, TAESD's config).

Targets, each in a fresh process (peak RSS its own): ours (runtime.load(...).txt2img on OpenVINO f32,
bf16 where the CPU has it, and the opt-in int8 U-Net of `build-engine --quantize int8`, tiny VAE
only); diffusers fp32 eager; optimum-intel (FastSD CPU's recipe: static reshape, the tiny VAE as its
VAE decoder) at f32 and at OpenVINO's default precision; openvino.genai Text2ImagePipeline on
optimum's IR, likewise. Every target starts from the same latents; each image's PSNR against ours
at f32 is reported (a check that the targets do the same work; LCM's re-noising draws differ, so
only the Turbo-style image is comparable across implementations).

Per target: end to end (median of `repeats` timed runs after `warmup` untimed ones, min and max),
seconds per stage (text encoder, one U-Net call, VAE decode) from the same runs, load time and peak
RSS. The report states the issue's goals as pass / fail from the run's own ratios (`goals`) and names
the CPU and its flags. Folders are built once under --cache-dir and reused (about 35 GB: four
diffusers folders sharing their files by hard links, their engine folders, optimum's IR).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine as mach
from benchmarks import peers
from benchmarks.suite import DEFAULT_CACHE, RESULTS_DIR, ROOT, _run_worker
from benchmarks.worker import PROMPT

SCHEMA = "fewstep-1"
WORKER = "benchmarks.fewstep_worker"
# Goals of issue 25 ("Must show"), as ratios of this run's own medians
GOAL_SPEEDUP = 1.2  # ours with the tiny VAE vs the fastest peer at the same precision, end to end
GOAL_INT8_SPEEDUP = 1.5  # our int8 U-Net vs the fastest peer, end to end
GOAL_TINY_DECODE = 0.10  # tiny decode time / full VAE decode time, ours, 512x512
PEER_KINDS = ("diffusers", "optimum", "genai")


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "turbo" | "lcm": the folder and the peers' pipeline class
    steps: int
    guidance_scale: float
    label: str


@dataclass(frozen=True)
class FewTarget:
    name: str
    kind: str  # "engine" | "diffusers" | "optimum" | "genai"
    label: str
    precision: str  # "f32" | "default" (OpenVINO's choice: bf16 where the CPU has it) | "int8"
    options: dict[str, Any] = field(default_factory=dict)  # engines: runtime.load options
    vaes: tuple[str, ...] = ("full", "tiny")


SCENARIOS = {
    "turbo-1": Scenario("turbo-1", "turbo", 1, 0.0, "1 step, guidance 0 (Turbo-style trailing Euler)"),
    # guidance 8: diffusers' LatentConsistencyModelPipeline default is 8.5; LCM_Dreamshaper_v7's card uses 8.0
    "lcm-4": Scenario("lcm-4", "lcm", 4, 8.0, "4 LCM steps, LCM-distilled U-Net, guidance 8 (embedded)"),
}
VAES = ("full", "tiny")
TARGETS = {
    "ours-f32": FewTarget("ours-f32", "engine", "ours, OpenVINO f32", "f32",
                          {"inference_precision": "f32", "quantized": False}),
    "ours-bf16": FewTarget("ours-bf16", "engine", "ours, OpenVINO bf16", "default",
                           {"inference_precision": "bf16", "quantized": False}),
    "ours-int8": FewTarget("ours-int8", "engine", "ours, int8 U-Net (build-engine --quantize int8), rest bf16/f32",
                           "int8", {"quantized": True}, vaes=("tiny",)),
    "diffusers-fp32": FewTarget("diffusers-fp32", "diffusers", "diffusers 0.42 PyTorch fp32 eager", "f32"),
    "optimum-f32": FewTarget("optimum-f32", "optimum", "optimum-intel, static reshape, f32", "f32"),
    "optimum": FewTarget("optimum", "optimum", "optimum-intel, static reshape, OpenVINO default precision", "default"),
    "genai-f32": FewTarget("genai-f32", "genai", "openvino.genai Text2ImagePipeline, static reshape, f32", "f32"),
    "genai": FewTarget("genai", "genai", "openvino.genai Text2ImagePipeline, static reshape, default precision",
                       "default"),
}


@dataclass
class FewSettings:
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    vaes: tuple[str, ...] = VAES
    targets: tuple[str, ...] = tuple(TARGETS)
    resolution: int = 512
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    weights_seed: int = 0
    model: str = "sd15"
    cache_dir: str = str(DEFAULT_CACHE)
    timeout_s: float = 3600.0
    # building the folders: four engine exports, then per tiny folder an int8 U-Net (calibration and
    # nncf.quantize at 512 px: 19 min each on a 2-vCPU Xeon with AMX, 2026-12-07), so one hour was too short
    prepare_timeout_s: float = 4 * 3600.0
    peer_python: dict[str, str] = field(default_factory=dict)


def cache_root(s: FewSettings) -> Path:
    return Path(s.cache_dir) / f"fewstep-{s.model}-seed{s.weights_seed}"


def folder(scenario: Scenario, vae: str) -> str:
    return f"{scenario.kind}-{vae}"


def availability(target: FewTarget, s: FewSettings) -> tuple[bool, str]:
    """(True, "") or (False, why the target is skipped here)."""
    if target.kind in ("optimum", "genai"):
        return peers.availability(target.kind, s.peer_python.get(target.kind))
    if target.kind == "diffusers":
        try:
            import diffusers  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            return False, f"diffusers / torch not installed ({e})"
        return True, ""
    from runtime.engines import openvino

    ok, why = openvino.is_available()
    if not ok:
        return False, why
    if target.precision == "int8":
        from export.quantize import is_available as quantize_available

        ok, why = quantize_available()
        return (ok, "" if ok else f"the int8 U-Net is built with nncf: {why}")
    if target.options.get("inference_precision") == "bf16" and "BF16" not in openvino.cpu_capabilities():
        return False, "this CPU has no bf16 hardware (OpenVINO CPU capabilities: " \
                      f"{', '.join(openvino.cpu_capabilities())})"
    return True, ""


def prepare(s: FewSettings, workdir: Path, runnable: dict[str, FewTarget], log) -> dict[str, Any]:
    """Diffusers and engine folders (in the project env), then optimum's IR (in its venv) where a
    peer of that venv runs; each made once under the cache and reused."""
    root = cache_root(s)
    names = sorted({folder(SCENARIOS[sc], v) for sc in s.scenarios for v in s.vaes})
    int8 = sorted(folder(SCENARIOS[sc], "tiny") for sc in s.scenarios) if "ours-int8" in runnable else []
    log(f"preparing folders {names} under {root} (built once, then reused)")
    task = {"kind": "prepare", "target": "fewstep-prepare", "worker_module": WORKER, "model": s.model,
            "seed": s.weights_seed, "resolution": s.resolution, "diffusers_root": str(root / "diffusers"),
            "engine_root": str(root / "engine"), "folders": names, "int8_folders": int8}
    out = {"project": _run_worker(task, workdir, s.prepare_timeout_s)}
    if out["project"]["status"] != "ok":
        raise RuntimeError(f"could not build the few-step folders: {out['project'].get('reason')}\n"
                           f"{out['project'].get('traceback', '')}")
    venv = next((t.kind for t in runnable.values() if t.kind in ("optimum", "genai")), None)
    for sc in (s.scenarios if venv else ()):
        scenario = SCENARIOS[sc]
        task = {"kind": "fewstep_prepare", "target": f"optimum-prepare-{scenario.kind}",
                "worker_python": str(peers.interpreter("optimum", s.peer_python.get("optimum"))),
                "worker_module": peers.runner("optimum").module, "scenario_kind": scenario.kind,
                "diffusers_dir": str(root / "diffusers" / folder(scenario, "full")),
                "tiny_vae_dir": str(root / "diffusers" / folder(scenario, "tiny") / "vae"),
                "ov_dir": str(root / "optimum" / folder(scenario, "full")),
                "ov_tiny_dir": str(root / "optimum" / folder(scenario, "tiny"))}
        out[f"optimum/{scenario.kind}"] = _run_worker(task, workdir, s.prepare_timeout_s)
    return out


def target_task(t: FewTarget, sc: Scenario, vae: str, s: FewSettings, workdir: Path) -> dict[str, Any]:
    root, name = cache_root(s), folder(sc, vae)
    task = {"kind": t.kind, "target": f"{sc.name}.{vae}.{t.name}", "scenario_kind": sc.kind, "steps": sc.steps,
            "guidance_scale": sc.guidance_scale, "resolution": s.resolution, "seed": s.seed, "prompt": PROMPT,
            "repeats": s.repeats, "warmup": s.warmup, "latents_path": str(workdir / f"latents-{vae}.npy"),
            "image_path": str(workdir / f"{sc.name}.{vae}.{t.name}.image.npy"), "worker_module": WORKER}
    if t.kind == "engine":
        task.update(engine_dir=str(root / "engine" / name), options=t.options)
    elif t.kind == "diffusers":
        task.update(diffusers_dir=str(root / "diffusers" / name))
    else:  # a peer of the optimum venv: its worker over optimum's IR
        task.update(kind="fewstep", precision=t.precision, ov_dir=str(root / "optimum" / name),
                    worker_python=str(peers.interpreter(t.kind, s.peer_python.get(t.kind))),
                    worker_module=peers.runner(t.kind).module)
    return task


def latents(s: FewSettings, vae: str) -> np.ndarray:
    """The initial noise every target starts from: drawn as the runtime draws a seed's
    (np.random.Generator(PCG64(seed)), runtime/stages.py), [1, 4, res / f, res / f] with f the VAE's
    scale factor (8 for SD 1.5's VAE and for AutoencoderTiny; the tiny-sd1 test preset's VAE has its own)."""
    from export.configs import preset

    f = 8 if vae == "tiny" else preset(s.model).vae_scale_factor  # AutoencoderTiny: 2 ** (4 blocks - 1)
    lh = s.resolution // f
    return np.random.Generator(np.random.PCG64(s.seed)).standard_normal((1, 4, lh, lh), dtype=np.float32)


def run_all(s: FewSettings, workdir: Path, log) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(prepare results, results keyed SCENARIO/VAE/TARGET, skip reasons per target)."""
    runnable, skipped = {}, {}
    for name in s.targets:
        ok, why = availability(TARGETS[name], s)
        (runnable.__setitem__(name, TARGETS[name]) if ok else skipped.__setitem__(name, why))
        if not ok:
            log(f"{name}: skipped ({why})")
    for vae in s.vaes:
        np.save(workdir / f"latents-{vae}.npy", latents(s, vae))
    prepared = prepare(s, workdir, runnable, log)
    results: dict[str, Any] = {}
    for sc in (SCENARIOS[n] for n in s.scenarios):
        for vae in s.vaes:
            for t in (t for t in runnable.values() if vae in t.vaes):
                key = f"{sc.name}/{vae}/{t.name}"
                why = _prepare_failure(prepared, t, sc, vae)
                if why:
                    results[key] = {"status": "failed", "reason": why, "label": t.label, "precision": t.precision}
                    log(f"{key}: failed ({why})")
                    continue
                log(f"{key}: running")
                r = _run_worker(target_task(t, sc, vae, s, workdir), workdir, s.timeout_s)
                r.update(label=t.label, precision=t.precision)
                results[key] = r
                log(f"{key}: {r['status']}" + (f" ({r.get('reason')})" if r["status"] != "ok" else
                                              f" e2e {r['e2e']['median_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MiB"))
            image_psnr(workdir, results, sc.name, vae)
    return prepared, results, skipped


def _prepare_failure(prepared: dict[str, Any], t: FewTarget, sc: Scenario, vae: str) -> str | None:
    """Why `t` cannot run on the folders `prepare` made, or None."""
    if t.kind in ("optimum", "genai"):
        r = prepared.get(f"optimum/{sc.kind}", {})
        return None if r.get("status") == "ok" else f"optimum export: {r.get('reason')}"
    if t.precision == "int8":
        return prepared["project"]["prepare"]["int8_errors"].get(folder(sc, vae))
    return None


def image_psnr(workdir: Path, results: dict[str, Any], scenario: str, vae: str) -> None:
    """Each target's image PSNR (dB, runtime.compare.psnr) against ours at f32, same latents."""
    from runtime.compare import psnr

    ref = workdir / f"{scenario}.{vae}.ours-f32.image.npy"
    if not ref.is_file():
        return
    a = np.load(ref)
    for key, r in results.items():
        sc, v, name = key.split("/")
        path = workdir / f"{sc}.{v}.{name}.image.npy"
        if (sc, v) != (scenario, vae) or name == "ours-f32" or r.get("status") != "ok" or not path.is_file():
            continue
        b = np.load(path)
        r["e2e"]["psnr_vs_ours_f32_db"] = psnr(b, a) if b.shape == a.shape else None


# ----------------------------------------------------------------------------------------- goals


def _median(results: dict[str, Any], key: str, what: str = "e2e") -> float | None:
    r = results.get(key, {})
    if r.get("status") != "ok":
        return None
    return r["e2e"]["median_s"] if what == "e2e" else r["e2e"]["stages"].get(what)


def _fastest_peer(results: dict[str, Any], sc: str, vae: str, precisions: tuple[str, ...]) -> tuple[str, float] | None:
    timed = {name: _median(results, f"{sc}/{vae}/{name}") for name, t in TARGETS.items()
             if t.kind in PEER_KINDS and t.precision in precisions}
    timed = {n: v for n, v in timed.items() if v}
    return min(timed.items(), key=lambda kv: kv[1]) if timed else None


def _goal(what: str, value: float | None, bound: float, higher_is_better: bool, detail: str) -> dict[str, Any]:
    ok = None if value is None else (value >= bound if higher_is_better else value <= bound)
    return {"goal": what, "value": value, "bound": bound, "pass": ok, "detail": detail}


def goals(results: dict[str, Any], s: FewSettings) -> list[dict[str, Any]]:
    """The issue's goals as pass / fail (None: not measured in this run) from this run's ratios."""
    out = []
    for sc in s.scenarios:
        for ours, precisions in (("ours-f32", ("f32",)), ("ours-bf16", ("default",))):
            mine, best = _median(results, f"{sc}/tiny/{ours}"), _fastest_peer(results, sc, "tiny", precisions)
            ratio = best[1] / mine if mine and best else None
            out.append(_goal(f"{sc}, tiny VAE: {ours} >= {GOAL_SPEEDUP}x the fastest peer at its precision",
                             ratio, GOAL_SPEEDUP, True, f"{ours} {mine:.3f} s vs {best[0]} {best[1]:.3f} s" if best and mine
                             else "not measured"))
        mine, best = _median(results, f"{sc}/tiny/ours-int8"), _fastest_peer(results, sc, "tiny", ("f32", "default"))
        psnr_db = results.get(f"{sc}/tiny/ours-int8", {}).get("e2e", {}).get("psnr_vs_ours_f32_db")
        out.append(_goal(f"{sc}, tiny VAE: ours-int8 >= {GOAL_INT8_SPEEDUP}x the fastest peer", best[1] / mine
                         if mine and best else None, GOAL_INT8_SPEEDUP, True,
                         (f"ours-int8 {mine:.3f} s vs {best[0]} {best[1]:.3f} s; int8 image PSNR vs ours-f32: "
                          f"{_s(psnr_db, 1)} dB"
                          if mine and best else "not measured")))
        for ours in ("ours-f32", "ours-bf16"):
            tiny, full = (_median(results, f"{sc}/{v}/{ours}", "vae_decode") for v in ("tiny", "full"))
            out.append(_goal(f"{sc}: {ours} tiny decode <= {GOAL_TINY_DECODE:.0%} of the full VAE decode",
                             tiny / full if tiny and full else None, GOAL_TINY_DECODE, False,
                             f"tiny {_s(tiny)} s, full {_s(full)} s"))
        for vae in s.vaes:
            ref = results.get(f"{sc}/{vae}/diffusers-fp32", {}).get("peak_rss_mb")
            for ours in ("ours-f32", "ours-bf16", "ours-int8"):
                mine = results.get(f"{sc}/{vae}/{ours}", {}).get("peak_rss_mb")
                if results.get(f"{sc}/{vae}/{ours}", {}).get("status") == "ok":
                    out.append(_goal(f"{sc}, {vae} VAE: {ours} peak RSS <= diffusers fp32's", mine / ref if ref
                                     else None, 1.0, False, f"{mine:.0f} MiB vs {_s(ref, 0)} MiB"))
    return out


# ---------------------------------------------------------------------------------------- report


def _s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def machine_line(report: dict[str, Any]) -> str:
    """The CPU, its flags, memory and the load average at start and end, as one sentence."""
    cpu = report["machine"]["cpu"]
    flags = ", ".join(k for k, v in cpu.get("flags", {}).items() if v)
    return (f"CPU: {cpu.get('model')} ({cpu.get('usable_cpus')} usable of {cpu.get('logical_cpus')} logical CPUs), "
            f"flags: {flags}; memory {report['machine'].get('memory_gib')} GiB; load average at start "
            f"{report.get('load_average_start')}, at end {report.get('load_average_end')}.")


def goal_lines(title: str, goals: list[dict[str, Any]]) -> list[str]:
    """A goals table (records of `_goal`) under `title`: value, bound, pass / FAIL / not measured."""
    lines = [title, "", "| goal | value | bound | result | detail |", "|---|---|---|---|---|"]
    for g in goals:
        verdict = {True: "pass", False: "FAIL", None: "not measured"}[g["pass"]]
        lines.append(f"| {g['goal']} | {_s(g['value'], 2)} | {g['bound']} | {verdict} | {g['detail']} |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Few-step images on a CPU ({report['created']})", "", machine_line(report),
             f"Settings: {report['settings']['resolution']}x{report['settings']['resolution']}, batch 1, "
             f"{report['settings']['repeats']} timed runs after {report['settings']['warmup']} untimed; "
             "full-size SD 1.5 architecture, random weights.", ""]
    for sc in report["settings"]["scenarios"]:
        for vae in report["settings"]["vaes"]:
            lines += [f"## {SCENARIOS[sc].label}, {vae} VAE", "",
                      "| target | precision | end to end s (min-max) | text encoder s | U-Net s/call | VAE decode s "
                      "| load s | peak RSS MiB | PSNR vs ours-f32 dB |", "|---|---|---|---|---|---|---|---|---|"]
            for key, r in report["results"].items():
                if not key.startswith(f"{sc}/{vae}/"):
                    continue
                name = key.split("/")[2]
                if r.get("status") != "ok":
                    lines.append(f"| {name} | {r.get('precision', '')} | {r['status']}: {str(r.get('reason'))[:160]} "
                                 "| | | | | | |")
                    continue
                e, st = r["e2e"], r["e2e"]["stages"]
                lines.append(f"| {name} | {r['precision']} | {_s(e['median_s'])} ({_s(e['min_s'])}-{_s(e['max_s'])}) "
                             f"| {_s(st.get('text_encoder'))} | {_s(st.get('unet'))} | {_s(st.get('vae_decode'))} "
                             f"| {_s(r.get('load_s'), 1)} | {r['peak_rss_mb']:.0f} | {_s(e.get('psnr_vs_ours_f32_db'), 1)} |")
            lines.append("")
    lines += goal_lines("## Goals (issue 25), from this run's ratios", report["goals"])
    if report.get("skipped"):
        lines += ["", "Skipped targets: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> tuple[FewSettings, Path | None]:
    p = argparse.ArgumentParser(prog="python -m benchmarks --fewstep", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", nargs="+", choices=tuple(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--vaes", nargs="+", choices=VAES, default=list(VAES))
    p.add_argument("--targets", nargs="+", choices=tuple(TARGETS), default=list(TARGETS))
    p.add_argument("--model", choices=("sd15", "tiny-sd1"), default="sd15",
                   help="the architecture (tiny-sd1: the test preset, for a quick check of the plumbing)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per target (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default 1: compiles)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="folders built once and reused")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per target process")
    p.add_argument("--prepare-timeout", type=float, default=4 * 3600.0,
                   help="seconds allowed per folder-building process (default 4 h: exports and int8 U-Nets)")
    add_peer_args(p, "fewstep-<res>-<date>")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0 or a.resolution % 8:
        p.error("--repeats must be >= 1, --warmup >= 0, --resolution a multiple of 8")
    s = FewSettings(scenarios=tuple(a.scenarios), vaes=tuple(a.vaes), targets=tuple(a.targets),
                    model=a.model, resolution=a.resolution, repeats=a.repeats, warmup=a.warmup, cache_dir=a.cache_dir,
                    timeout_s=a.timeout, prepare_timeout_s=a.prepare_timeout, peer_python=peer_python(a))
    return s, a.out


def run(s: FewSettings, out: Path | None = None, command: str | None = None, log=None) -> dict[str, Any]:
    log = log or (lambda msg: print(f"[fewstep] {msg}", file=sys.stderr, flush=True))
    started = datetime.now(timezone.utc)
    out = out or RESULTS_DIR / f"fewstep-{s.resolution}-{started:%Y%m%d-%H%M}.json"
    report = report_head(SCHEMA, command, started, s)
    with tempfile.TemporaryDirectory(prefix="sd-fewstep-") as tmp:
        report["prepare"], report["results"], report["skipped"] = run_all(s, Path(tmp), log)
    report["load_average_end"] = mach.load_average()
    report["goals"] = goals(report["results"], s)
    report["peak_rss_mb_max"] = max((r.get("peak_rss_mb", 0.0) for r in report["results"].values()), default=0.0)
    return write_report(report, out, render_markdown, log)


def add_peer_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """The options every benchmark with the optimum and genai peers takes: their venvs' Pythons, --out."""
    for name in ("optimum", "genai"):
        p.add_argument(f"--{name}-python", default=None, metavar="PATH",
                       help=f"Python of the {name} peer's venv (default {peers.runner(name).venv}/bin/python)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (.md beside it); default "
                   f"benchmarks/results/{default_out}.json")


def peer_python(a: argparse.Namespace) -> dict[str, str]:
    """The --optimum-python / --genai-python given (add_peer_args), by peer."""
    return {n: getattr(a, f"{n}_python") for n in ("optimum", "genai") if getattr(a, f"{n}_python")}


def report_head(schema: str, command: str | None, started: datetime, settings: Any) -> dict[str, Any]:
    """A report's first fields: what ran, where, with which versions and settings (a dataclass)."""
    return {"schema": schema, "command": command, "created": started.isoformat(timespec="seconds"),
            "machine": mach.machine(), "versions": mach.versions(), "git": mach.git_commit(ROOT),
            "settings": asdict(settings), "load_average_start": mach.load_average()}


def write_report(report: dict[str, Any], out: Path, render, log) -> dict[str, Any]:
    """`report` as JSON at `out` and `render(report)` as markdown beside it; returns `report`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(render(report))
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return report


def main(argv: list[str]) -> int:
    s, out = parse_args(argv)
    report = run(s, out, command=" ".join(["python -m benchmarks --fewstep", *argv]))
    print(render_markdown(report))
    return 1 if any(r.get("status") == "failed" for r in report["results"].values()) else 0

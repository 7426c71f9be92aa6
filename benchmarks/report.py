"""Markdown rendering of a suite report (the JSON written by `benchmarks/suite.py`)."""

from __future__ import annotations

from typing import Any

COLUMNS = (("text_encoder", "text encoder"), ("unet", "U-Net"), ("vae_decoder", "VAE decode"),
           ("vae_encoder", "VAE encode"))


def _cell(node: dict[str, Any] | None) -> str:
    if not node or "median_s" not in node:
        return "-"
    if node.get("repeats", 1) > 1:
        return f"{node['median_s']:.3g} ({node['min_s']:.3g}-{node['max_s']:.3g})"
    return f"{node['median_s']:.3g}"


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x else "-"


def render_markdown(report: dict[str, Any]) -> str:
    return "\n".join([*_header_lines(report), *_target_rows(report), *_cached_lines(report),
                      *_summary_lines(report)])


def _header_lines(report: dict[str, Any]) -> list[str]:
    """Title, command, machine, versions, how timing was done, the default engine; the table's head."""
    s = report["settings"]
    cpu = report["machine"]["cpu"]
    flags = ", ".join(f for f, on in cpu.get("flags", {}).items() if on) or "unknown"
    v = report["versions"]
    return [
        f"## {s['model']} at {s['resolution']}x{s['resolution']}, batch {s['batch']}, {s['steps']} steps, "
        f"guidance {s['guidance_scale']}",
        "",
        f"- command: `{report.get('command')}`",
        f"- machine: {cpu.get('model')}, {cpu.get('usable_cpus')} usable CPUs, {report['machine'].get('memory_gib')} GiB; "
        f"bf16 hardware: {'yes' if cpu.get('bf16_hardware') else 'no'} (flags: {flags}); "
        f"load average at start / end {report.get('load_average_start')} / {report.get('load_average_end')}",
        *_cap_line(report),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- timing: median of {s['repeats']} calls after {s['warmup']} warm-up (min-max in brackets), seconds"
        + (f", per process; per network the median of {s['process_repeats']} fresh processes' medians (min-max over "
           "all their calls)" if s.get("process_repeats", 1) > 1 else "") + "; "
        f"U-Net and text encoder at the guidance batch {2 * s['batch']}; end to end: median of "
        f"{s['e2e_repeats']} txt2img after {s['e2e_warmup']} 2-step warm-up; peak RSS of the end-to-end process "
        "(per-network process when there is no end to end); U-Net CPU s: process CPU seconds per call, all threads",
        f"- default engine (what `runtime.load` picks here): **{report.get('default_engine')}**"
        + (f" ({report['default_engine_reason']})" if report.get("default_engine_reason") else ""),
        "",
        "| target | " + " | ".join(title for _, title in COLUMNS) + " | txt2img end to end | peak RSS MiB | U-Net parity | U-Net CPU s |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " | ---: | ---: | ---: | ---: |",
    ]


def _target_rows(report: dict[str, Any]) -> list[str]:
    """One table row per target (a failed or skipped one with its reason), then the U-Net medians of
    each fresh process where the run repeated processes."""
    lines = []
    for name, r in report["results"].items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('reason', '')[:160]} |" + " |" * (len(COLUMNS) + 3))
            continue
        nets = r.get("networks", {})
        par = nets.get("unet", {}).get("parity", {}).get("max_rel_err")
        lines.append(
            f"| {name} | " + " | ".join(_cell(nets.get(k)) for k, _ in COLUMNS)
            + f" | {_cell(r.get('e2e'))} | {r.get('peak_rss_mb', 0):.0f} | "
            + (f"{par:.1e}" if par is not None else "-") + " | "
            + (f"{nets['unet']['cpu_median_s']:.3g}" if "cpu_median_s" in nets.get("unet", {}) else "-") + " |")
    spread = {name: r["networks"]["unet"]["process_medians_s"] for name, r in report["results"].items()
              if r.get("status") == "ok" and "process_medians_s" in r.get("networks", {}).get("unet", {})}
    if spread:
        lines += ["", "U-Net median per fresh process, s: " + "; ".join(
            f"{name} {', '.join(f'{t:.3g}' for t in times)}" for name, times in spread.items())]
    return lines


def _summary_lines(report: dict[str, Any]) -> list[str]:
    """The default engine's speed-ups (plain, with step caching, int8), scheduler overhead, fastest."""
    summ = report.get("summary", {})
    so = report.get("scheduler_overhead", {})
    lines = [
        "",
        f"- default engine U-Net call: {_ratio(summ.get('unet_speedup_vs_diffusers-fp32'))} faster than PyTorch fp32 "
        f"eager, {_ratio(summ.get('unet_speedup_vs_diffusers-bf16'))} than PyTorch bf16 eager; parity "
        f"{summ.get('default_engine_unet_parity')}",
        f"- default engine txt2img end to end: {_ratio(summ.get('e2e_speedup_vs_diffusers-fp32'))} faster than the "
        f"diffusers fp32 pipeline, {_ratio(summ.get('e2e_speedup_vs_diffusers-bf16'))} than bf16",
    ]
    cached = summ.get("cached")
    if cached:
        lines.append(
            f"- default engine with step caching (interval {cached.get('cache_interval')}): end to end "
            f"{_ratio(cached.get('speedup_vs_uncached'))} faster than uncached, "
            f"{_ratio(cached.get('e2e_speedup_vs_diffusers-fp32'))} than the diffusers fp32 pipeline, "
            f"{_ratio(cached.get('e2e_speedup_vs_optimum'))} than optimum-intel (default precision), "
            f"{_ratio(cached.get('e2e_speedup_vs_optimum-f32'))} than optimum-intel f32; image PSNR vs uncached "
            + (f"{cached['psnr_vs_uncached_db']:.1f} dB" if cached.get("psnr_vs_uncached_db") is not None else "-"))
    int8 = summ.get("openvino-int8")
    if int8:
        lines.append(
            f"- opt-in int8 U-Net (build-engine --quantize int8): U-Net call {_ratio(int8.get('unet_speedup_vs_diffusers-fp32'))} "
            f"faster than PyTorch fp32 eager, {_ratio(int8.get('unet_speedup_vs_diffusers-bf16'))} than bf16; end to end "
            f"{_ratio(int8.get('e2e_speedup_vs_diffusers-fp32'))} / {_ratio(int8.get('e2e_speedup_vs_diffusers-bf16'))}; "
            f"parity {int8.get('unet_parity')}")
    lines += [
        "- scheduler overhead: " + (f"{so.get('per_step_ms'):.3f} ms per step ({so.get('sampler')}, shape {so.get('shape')})"
                                    if so.get("status") == "ok" and so.get("per_step_ms") is not None
                                    else f"{so.get('status')}: {so.get('reason', '')}"),
        f"- fastest: U-Net {summ.get('fastest', {}).get('unet')}, end to end {summ.get('fastest', {}).get('e2e')}",
        "",
    ]
    return lines


def _cached_lines(report: dict[str, Any]) -> list[str]:
    """The step-caching table: each engine end to end with and without caching, and the image PSNRs."""
    rows = [(name, r) for name, r in report["results"].items() if r.get("status") == "ok" and r.get("e2e_cached")]
    psnrs = [(name, r["e2e"]["image_psnr"]) for name, r in report["results"].items()
             if r.get("status") == "ok" and (r.get("e2e") or {}).get("image_psnr", {}).get("db") is not None]
    lines = []
    if rows:
        interval = report["settings"].get("cache_interval")
        lines += ["", f"Step caching (DeepCache, a full U-Net every {interval} calls), end to end, s: uncached and "
                  "cached runs alternating in one process (median of each; min-max in brackets)", "",
                  "| target | uncached | cached | speed-up | image PSNR cached vs uncached | peak RSS MiB, both in one process |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in rows:
            c = r["e2e_cached"]
            db = c.get("psnr_vs_uncached_db")
            lines.append(f"| {name} | {_cell(c.get('paired_uncached'))} | {_cell(c)} | {_ratio(c.get('speedup_vs_uncached'))} | "
                         + (f"{db:.1f} dB" if db is not None else "-")
                         + f" | {r.get('peak_rss_mb_e2e_cached', 0):.0f} |")
    if psnrs:
        lines += ["", "End-to-end image PSNR against " + psnrs[0][1]["reference"] + " (same initial noise): "
                  + "; ".join(f"{name} {p['db']:.1f} dB" for name, p in psnrs)]
    return lines


def _cap_line(report: dict[str, Any]) -> list[str]:
    """A line naming the instruction-set cap of an emulated run (benchmarks/machine.py isa_cap)."""
    cap = report["machine"].get("isa_cap") or {}
    if not cap.get("ONEDNN_MAX_CPU_ISA") and not cap.get("ATEN_CPU_CAPABILITY"):
        return []
    return [f"- **ISA cap (emulation, not a native run)**: ONEDNN_MAX_CPU_ISA={cap.get('ONEDNN_MAX_CPU_ISA')}, "
            f"ATEN_CPU_CAPABILITY={cap.get('ATEN_CPU_CAPABILITY')}; features our defaults see: "
            f"{', '.join(cap.get('features_seen') or []) or 'none'}. oneDNN/OpenVINO and PyTorch honour the cap; "
            "ONNX Runtime's MLAS kernels dispatch on CPUID and ignore it"]

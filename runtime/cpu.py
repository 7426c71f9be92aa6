"""What this CPU can do, as the engines' kernels will see it.

`features()` is the set of instruction-set features that decide our defaults: "avx2", "avx512"
(AVX-512 F/BW/VL/DQ, oneDNN's avx512_core), "vnni" (AVX-512 VNNI or AVX-VNNI: int8 dot products
without the u8 x s8 -> s16 saturation of `vpmaddubsw`), "bf16" (AVX512_BF16) and "amx"
(AMX-BF16 + AMX-INT8). It is the hardware's flags (/proc/cpuinfo), less what this process's own
CPUID denies (as numpy reads it at import: under an emulator such as `qemu-x86_64 -cpu max` the
kernel's flags list AVX-512 while the process's CPUID shows an AVX2-only CPU, and every library's
kernels follow the CPUID), intersected with the cap
`ONEDNN_MAX_CPU_ISA`, oneDNN's documented variable, which OpenVINO's CPU plugin honours too
(measured here: under `ONEDNN_MAX_CPU_ISA=AVX2` an int8 U-Net quantized without NNCF's overflow
fix shows the no-VNNI saturation, rms error 0.089 against 0.028 uncapped, on the demo model). So
one VNNI/AMX machine can exercise the AVX2-only paths of the engine and of our defaults:

    ONEDNN_MAX_CPU_ISA=AVX2 python -m pytest -q

The cap reaches oneDNN's kernels only (ONNX Runtime's MLAS ignores it). An emulated AVX2-only CPU
reaches all of them: `ONEDNN_MAX_CPU_ISA=AVX2 qemu-x86_64 -cpu max python ...` (QEMU 7.2's TCG
implements AVX2 and FMA but no AVX-512, AVX-VNNI or AMX; the cap drops the AVX-VNNI that numpy
cannot see, below). `bash tools/avx2_check.sh TESTS` runs chosen tests that way.

Values follow oneDNN's `dnnl_cpu_isa_t` names (docs: "CPU Dispatcher Control"); unknown values
are treated as no cap. Not x86: `features()` is empty and the engines' own capability reports
decide.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

CAP_VARIABLE = "ONEDNN_MAX_CPU_ISA"
# oneDNN ISA cap name -> the features it still allows (oneDNN's cpu_isa_t hierarchy: avx512_core
# does not include avx2_vnni, so AVX512_CORE excludes VNNI of either kind)
_CAPS = {
    "SSE41": frozenset(), "AVX": frozenset(), "AVX2": frozenset({"avx2"}),
    "AVX2_VNNI": frozenset({"avx2", "vnni"}), "AVX2_VNNI_2": frozenset({"avx2", "vnni"}),
    "AVX512_CORE": frozenset({"avx2", "avx512"}), "AVX512_CORE_VNNI": frozenset({"avx2", "avx512", "vnni"}),
    "AVX512_CORE_BF16": frozenset({"avx2", "avx512", "vnni", "bf16"}),
    "AVX512_CORE_FP16": frozenset({"avx2", "avx512", "vnni", "bf16"}),
    "AVX10_1_512": frozenset({"avx2", "avx512", "vnni", "bf16"}),
    "AVX512_CORE_AMX": frozenset({"avx2", "avx512", "vnni", "bf16", "amx"}),
    "AVX10_1_512_AMX": frozenset({"avx2", "avx512", "vnni", "bf16", "amx"}),
}
_ALL = frozenset({"avx2", "avx512", "vnni", "bf16", "amx"})


def _flags(cpuinfo: str) -> frozenset[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def hardware_features(cpuinfo: str | None = None) -> frozenset[str]:
    """Features from the CPU's flags (`cpuinfo`: the text of /proc/cpuinfo; read when None, and then
    only the flags this process's CPUID confirms: `confirmed_flags`)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        return _flag_features(confirmed_flags(_flags(path.read_text() if path.is_file() else "")))
    return _flag_features(_flags(cpuinfo))


# /proc/cpuinfo flag -> the key of numpy's CPUID reading (numpy._core._multiarray_umath.__cpu_features__)
# that confirms it. numpy has no key for AVX-VNNI or AMX: AVX-VNNI is checked only as far as AVX2,
# AMX through AVX512_BF16 (every AMX CPU has it).
_CPUID_KEY = {"avx2": "AVX2", "fma": "FMA3", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512vl": "AVX512VL",
              "avx512dq": "AVX512DQ", "avx512_vnni": "AVX512VNNI", "avx512_bf16": "AVX512BF16", "avx_vnni": "AVX2",
              "amx_bf16": "AVX512BF16", "amx_int8": "AVX512BF16", "amx_tile": "AVX512BF16"}


def confirmed_flags(flags: frozenset[str]) -> frozenset[str]:
    """`flags` less those this process's CPUID (as numpy read it) denies; flags numpy has no key for
    pass as they are."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as seen
    except ImportError:  # numpy < 2 keeps it elsewhere
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as seen
        except ImportError:
            return flags
    return frozenset(f for f in flags if f not in _CPUID_KEY or seen.get(_CPUID_KEY[f], False))


def _flag_features(f: frozenset[str]) -> frozenset[str]:
    """Our feature names from a set of /proc/cpuinfo flags."""
    out = set()
    if "avx2" in f and "fma" in f:
        out.add("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= f:
        out.add("avx512")
    if "avx512_vnni" in f or "avx_vnni" in f:
        out.add("vnni")
    if "avx512_bf16" in f:
        out.add("bf16")
    if {"amx_bf16", "amx_int8", "amx_tile"} <= f:
        out.add("amx")
    return frozenset(out)


def isa_cap(environ: dict[str, str] | None = None) -> str | None:
    """The oneDNN ISA cap in force (upper-cased), or None. Without `environ`, the process's, read
    once: oneDNN (inside OpenVINO) latches it at its first use, so a later change of the variable
    changes neither the kernels nor our view of them. Run another cap in another process."""
    if environ is None:
        return _process_cap()
    value = environ.get(CAP_VARIABLE, "").strip().upper()
    return value if value in _CAPS else None


@functools.lru_cache(maxsize=1)
def _process_cap() -> str | None:
    return isa_cap(dict(os.environ))


def features(cpuinfo: str | None = None, environ: dict[str, str] | None = None) -> frozenset[str]:
    """The features kernels may use here: the hardware's, within the cap."""
    cap = isa_cap(environ)
    return hardware_features(cpuinfo) & (_CAPS[cap] if cap else _ALL)


@functools.lru_cache(maxsize=1)
def model_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    path = Path("/proc/cpuinfo")
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line for logs and reports, e.g. "Intel(R) Xeon(R) Processor: avx2 avx512 vnni bf16 amx"."""
    cap = isa_cap()
    feats = " ".join(sorted(features(), key=["avx2", "avx512", "vnni", "bf16", "amx"].index)) or "no AVX2"
    return f"{model_name()}: {feats}{f' (capped by {CAP_VARIABLE}={cap})' if cap else ''}"

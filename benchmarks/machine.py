"""What a benchmark ran on: CPU model, cores, the instruction-set flags that decide the fast paths
(AVX-512 BF16, AMX), memory, load, versions of every framework involved, and the git commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import protocol

# CPU flags that change which kernels the engines pick (Linux /proc/cpuinfo names).
INTERESTING_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")
PACKAGES = ("numpy", "onnx", "onnxruntime", "openvino", "torch", "diffusers", "transformers", "tokenizers")


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags":
            flags = set(value.split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "flags": {f: f in flags for f in INTERESTING_FLAGS} if flags else {},
        "bf16_hardware": bool(flags & {"avx512_bf16", "amx_bf16"}),
    }


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    """Python's version and each of PACKAGES' (None when absent), as the workers report theirs."""
    return protocol.versions(PACKAGES)


def git_commit(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def isa_cap() -> dict[str, Any]:
    """The instruction-set cap this run was under (runtime/cpu.py: ONEDNN_MAX_CPU_ISA, honoured by
    oneDNN and OpenVINO; ATEN_CPU_CAPABILITY, PyTorch's own kernel dispatch; ONNX Runtime's kernels
    take neither) and the features our defaults see under it."""
    from runtime import cpu

    return {"ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
            "features_seen": sorted(cpu.features())}


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_info(),
        "isa_cap": isa_cap(),
        "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "cuda": _cuda(),
    }


def _cuda() -> str | None:
    """The CUDA device name when torch sees one (only asked if torch is already installed)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

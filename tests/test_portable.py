"""Right on every x86-64 CPU (issue 13): the CPU features our defaults read (with oneDNN's ISA cap,
which lets one machine exercise another ISA's paths), OpenVINO's precision under the cap, and the
default backend measured per folder and machine."""

from __future__ import annotations

import json

import pytest

import runtime
from runtime import cpu
from runtime.engines import calibration

ZEN3 = "flags\t\t: fpu sse4_1 sse4_2 avx f16c fma avx2 bmi2 sha_ni vaes vpclmulqdq\n"
ZEN5 = ("flags\t\t: fpu avx fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni "
        "avx512_vbmi2 avx512_vpopcntdq\n")
SAPPHIRE_RAPIDS = ("flags\t\t: avx fma avx2 avx512f avx512dq avx512bw avx512vl avx_vnni avx512_vnni avx512_bf16 "
                   "amx_bf16 amx_tile amx_int8 avx512_fp16\n")


@pytest.mark.parametrize("text, expected", [
    (ZEN3, {"avx2"}),
    (ZEN5, {"avx2", "avx512", "vnni", "bf16"}),
    (SAPPHIRE_RAPIDS, {"avx2", "avx512", "vnni", "bf16", "amx"}),
    ("processor : 0\n", set()),  # not x86 (or no flags line): the engines' own reports decide
])
def test_features_from_cpu_flags(text, expected):
    assert cpu.features(text, environ={}) == expected


@pytest.mark.parametrize("cap, expected", [
    ("AVX2", {"avx2"}), ("avx2_vnni", {"avx2", "vnni"}), ("AVX512_CORE", {"avx2", "avx512"}),
    ("AVX512_CORE_VNNI", {"avx2", "avx512", "vnni"}), ("AVX512_CORE_BF16", {"avx2", "avx512", "vnni", "bf16"}),
    ("AVX512_CORE_AMX", {"avx2", "avx512", "vnni", "bf16", "amx"}), ("NOT_AN_ISA", {"avx2", "avx512", "vnni", "bf16", "amx"}),
])
def test_onednn_isa_cap_limits_features(cap, expected):
    assert cpu.features(SAPPHIRE_RAPIDS, environ={"ONEDNN_MAX_CPU_ISA": cap}) == expected
    assert cpu.features(ZEN3, environ={"ONEDNN_MAX_CPU_ISA": cap}) == {"avx2"} & expected


_CAPPED = """
import json
from runtime import cpu
from runtime.engines import openvino as ov_engine
try:
    ov_engine.resolve_precision("bf16")
    bf16 = "accepted"
except Exception as e:
    bf16 = str(e)
print(json.dumps({"features": sorted(cpu.features()), "caps": ov_engine.cpu_capabilities(),
                  "default": ov_engine.default_precision(), "bf16": bf16}))
"""


def _in_process_with_cap(cap: str | None) -> dict:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    out = subprocess.run([sys.executable, "-c", _CAPPED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_openvino_precision_follows_the_cap():
    """oneDNN latches the cap when a process first uses it, so each cap runs in its own process."""
    capped = _in_process_with_cap("AVX2")
    assert capped["features"] == ["avx2"] and "BF16" not in capped["caps"] and capped["default"] == "f32"
    assert "inference_precision 'bf16' is not supported by this CPU" in capped["bf16"]
    native = _in_process_with_cap(None)
    assert native["features"] == sorted(cpu.hardware_features())
    assert native["default"] == ("bf16" if "bf16" in cpu.hardware_features() else "f32")


def test_default_backend_is_measured_once_per_folder_and_machine(tiny_sd1_engine, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a user cache no earlier test has filled
    measured = []
    real = calibration.measure
    monkeypatch.setattr(calibration, "measure", lambda *a: measured.append(a[2]) or real(*a))
    with runtime.load(tiny_sd1_engine) as pipe:
        first = (pipe.backend, pipe.backend_reason)
    assert measured == [("openvino", "onnxruntime")]
    assert first[0] in ("openvino", "onnxruntime") and "fastest measured on this machine" in first[1]
    records = list(calibration.cache_dir().glob("*.json"))
    record = json.loads(records[0].read_text())
    assert len(records) == 1 and record["backend"] == first[0] == min(record["scores"], key=record["scores"].get)
    assert set(record["seconds"]["openvino"]) == {"unet", "vae_decoder"}
    with runtime.load(tiny_sd1_engine) as pipe:  # remembered: no second measurement
        assert (pipe.backend, pipe.backend_reason) == first
    assert len(measured) == 1
    # another machine: this one's key with VNNI toggled, so it differs whatever this CPU (or its cap) has
    here = calibration.machine_key()
    other = {**here, "features": sorted(set(here["features"]) ^ {"vnni"})}
    monkeypatch.setattr(calibration, "machine_key", lambda: other)  # measure again
    with runtime.load(tiny_sd1_engine) as pipe:
        assert "fastest measured on this machine" in pipe.backend_reason
    assert len(measured) == 2 and len(list(calibration.cache_dir().glob("*.json"))) == 2
    with runtime.load(tiny_sd1_engine, calibrate=False) as pipe:
        assert pipe.backend == "openvino" and "not measured: calibrate=False" in pipe.backend_reason
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
        assert pipe.backend_reason == "requested"
    assert len(measured) == 2


def test_flags_the_process_cpuid_denies_are_dropped(monkeypatch):
    """Under an emulator (qemu-x86_64 -cpu max) /proc/cpuinfo lists the host's AVX-512 and AMX while
    the process's CPUID, which every library's kernels follow, shows an AVX2-only CPU."""
    from numpy._core._multiarray_umath import __cpu_features__ as seen

    flags = cpu._flags(SAPPHIRE_RAPIDS)
    for key in [k for k in seen if k.startswith("AVX512")]:
        monkeypatch.setitem(seen, key, False)
    monkeypatch.setitem(seen, "AVX2", True)
    monkeypatch.setitem(seen, "FMA3", True)
    assert cpu._flag_features(cpu.confirmed_flags(flags)) == {"avx2", "vnni"}  # AVX-VNNI: no numpy key
    monkeypatch.setitem(seen, "AVX512BF16", True)
    for key in ("AVX512F", "AVX512BW", "AVX512VL", "AVX512DQ", "AVX512VNNI"):
        monkeypatch.setitem(seen, key, True)
    assert cpu._flag_features(cpu.confirmed_flags(flags)) == {"avx2", "avx512", "vnni", "bf16", "amx"}
    assert cpu.confirmed_flags(frozenset({"sse4_2", "avx2"})) == {"sse4_2", "avx2"}  # no key: kept

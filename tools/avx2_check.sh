#!/usr/bin/env bash
# Run tests on an emulated AVX2-only x86-64 CPU, on any x86-64 host:
#   bash tools/avx2_check.sh tests/test_openvino.py [more pytest arguments]
# QEMU's user-mode emulator (`qemu-x86_64 -cpu max`, Debian's qemu-user 7.2) presents a CPUID with
# AVX2 and FMA but no AVX-512, VNNI or AMX, so numpy, OpenVINO (oneDNN) and ONNX Runtime (MLAS) all
# dispatch their AVX2 kernels, unlike ONEDNN_MAX_CPU_ISA, which only oneDNN honours. The cap is set
# as well: the host's /proc/cpuinfo may list AVX-VNNI, which numpy cannot confirm (runtime/cpu.py),
# and QEMU does not implement. The interpreter runs through a wrapper that sys.executable names, so
# the tests' own subprocesses are emulated too. Emulation is ~50x slower than the host: pick tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
    echo "usage: bash tools/avx2_check.sh TESTS... (pytest arguments)" >&2
    exit 2
fi
command -v qemu-x86_64 > /dev/null || { echo "needs qemu-x86_64: apt-get install qemu-user" >&2; exit 2; }
py=$(python -c 'import os, sys; print(os.path.realpath(sys.executable))')
paths=$(python -c 'import os, sys; print(os.pathsep.join(p for p in sys.path if p))')
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir "$dir/bin"
# a venv-shaped folder: Python finds its standard library through `home`, the packages through PYTHONPATH
printf 'home = %s\ninclude-system-site-packages = true\n' "$(dirname "$py")" > "$dir/pyvenv.cfg"
cat > "$dir/bin/python" <<WRAPPER
#!/bin/sh
PYTHONPATH="$paths" exec qemu-x86_64 -cpu max -0 "$dir/bin/python" "$py" "\$@"
WRAPPER
chmod +x "$dir/bin/python"
export ONEDNN_MAX_CPU_ISA=AVX2
"$dir/bin/python" -c 'from runtime import cpu; print(f"emulated CPU: {cpu.describe()}")'
"$dir/bin/python" -m pytest -q -p no:cacheprovider "$@"

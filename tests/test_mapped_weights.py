"""Releasing the pages of mapped weight files (runtime/engines/mapped_weights.py).

The resident size of one mapping is read from /proc/self/smaps. What must hold: after `release`, a
read-only mapping of the file holds (almost) no resident pages and still reads the file's bytes; a
writable mapping of the same file keeps its pages and its unsaved writes; and an OpenVINO engine over
a graph with external weights computes exactly what it computed without the release, while its
mapping of the weights file ends up (almost) empty.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.engines import mapped_weights

pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and mapped_weights.supported()),
                                reason="madvise and /proc/self/maps are Linux's")


def resident_kib(path: Path) -> list[int]:
    """Rss (KiB) of each of this process's mappings of `path`, in address order."""
    real, sizes, current = os.path.realpath(path), [], False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:  # a mapping's header line
                current = len(fields) >= 6 and " ".join(fields[5:]) == real
            elif current and fields[0] == "Rss:":
                sizes.append(int(fields[1]))
    return sizes


@pytest.fixture
def weights_file(tmp_path) -> tuple[Path, bytes]:
    data = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()  # 8 MiB
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    return path, data


def test_release_drops_resident_pages_and_keeps_the_bytes(weights_file):
    path, data = weights_file
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert bytes(m) == data  # every page touched
        assert resident_kib(path) == [len(data) // 1024]
        advised = mapped_weights.release([path])
        assert advised == len(data)
        assert resident_kib(path)[0] <= 64  # a page or two may come back (readahead); 8192 KiB before
        assert bytes(m) == data  # read again from the page cache: nothing lost
        assert resident_kib(path) == [len(data) // 1024]


def test_release_leaves_writable_mappings_and_other_files(weights_file, tmp_path):
    path, data = weights_file
    other = tmp_path / "other.bin"
    other.write_bytes(data)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as private, \
            open(other, "rb") as g, mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ) as untouched:
        private[:4] = b"\x00\x01\x02\x03"  # a private write that must survive: copy-on-write, never saved
        assert bytes(private[4:]) == data[4:] and bytes(untouched) == data
        assert mapped_weights.release([path]) == 0  # its only mapping is writable
        assert bytes(private[:4]) == b"\x00\x01\x02\x03"
        assert resident_kib(path) == [len(data) // 1024]
        assert resident_kib(other) == [len(data) // 1024]
        assert mapped_weights.release([tmp_path]) == len(data)  # a folder stands for the files under it
        assert resident_kib(other)[0] <= 64 and resident_kib(path) == [len(data) // 1024]


def test_released_sweeps_while_the_block_runs(weights_file):
    path, data = weights_file
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        with mapped_weights.released([path], interval=0.01):
            assert bytes(m) == data
            deadline = time.monotonic() + 5
            while resident_kib(path)[0] > 64 and time.monotonic() < deadline:  # the next sweep empties it
                time.sleep(0.01)
            assert resident_kib(path)[0] <= 64, f"no sweep within 5 s (resident {resident_kib(path)} KiB)"
            assert bytes(m) == data
        assert resident_kib(path)[0] <= 64  # and once more when it ends


def test_openvino_engine_releases_its_external_weights(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from export.loading.read import random_model
    from export.onnx_export import default_parity_shapes, export_network
    from runtime.engines.openvino import OpenVinoEngine, is_available
    from runtime.folder.networks import network_io

    ok, why = is_available()
    if not ok:
        pytest.skip(why)
    tiny_sd1 = random_model("tiny-sd1", seed=0)
    shapes = default_parity_shapes(tiny_sd1.spec, 32, 32, 64, 2)
    result = export_network("unet", tiny_sd1, tmp_path, parity_shapes=shapes, external_data=True)
    data = tmp_path / result.external_data
    inputs, outputs = network_io("unet", tiny_sd1.spec.dims, "fp32")
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, tiny_sd1.spec.dims.text_hidden_size)).astype(np.float32)}

    def run() -> tuple[np.ndarray, int]:
        engine = OpenVinoEngine(tmp_path / result.file, "unet", inputs, outputs, inference_precision="f32",
                                cache_dir=None)
        try:
            out = engine.run(feeds)["noise_pred"]
            return out, sum(resident_kib(data))
        finally:
            engine.close()

    released_out, released_kib = run()
    monkeypatch.setattr(mapped_weights, "release", lambda paths: 0)
    kept_out, kept_kib = run()
    weights_kib = data.stat().st_size // 1024
    assert np.array_equal(released_out, kept_out)
    assert kept_kib >= weights_kib // 2, (kept_kib, weights_kib)  # the compiled model keeps the mapping
    assert released_kib <= max(64, weights_kib // 10), (released_kib, weights_kib)

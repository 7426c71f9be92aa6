"""The OpenVINO compile cache's bound (issue 13, runtime/engines/ov_cache.py): least recently used
entries go first, a variant larger than the bound is compiled without caching, a compile writes
through a temporary folder renamed into place, and `build-engine --prune-cache` trims a folder.
A fake `core` writes blobs of chosen sizes, so the rules are checked byte for byte; one test runs
the real OpenVINO engine on the tiny folder."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from runtime.engines import ov_cache


class FakeCore:
    """compile_model writes a `size`-byte blob into CACHE_DIR (as OpenVINO does) unless one is there."""

    def __init__(self, size: int):
        self.size, self.compiled, self.seen_dirs = size, 0, []

    def compile_model(self, model, device, config):
        self.compiled += 1
        where = config.get("CACHE_DIR")
        self.seen_dirs.append(where)
        if where is not None:
            Path(where).mkdir(parents=True, exist_ok=True)
            blob = Path(where) / "model.blob"
            if not blob.exists():
                blob.write_bytes(b"\0" * self.size)
        return ("compiled", model)


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_least_recently_used_entry_goes_first(tmp_path):
    cache = ov_cache.CompileCache(tmp_path / ov_cache.SUBDIR, limit_bytes=2500)
    core = FakeCore(1000)
    cache.compile(core, "a", "CPU", {}, {"net": "a"}, estimate_bytes=1000)
    (a_name,) = _entries(cache.root)
    time.sleep(0.02)
    cache.compile(core, "b", "CPU", {}, {"net": "b"}, estimate_bytes=1000)
    (b_name,) = set(_entries(cache.root)) - {a_name}
    assert ov_cache.folder_size(cache.root) == 2000
    assert core.seen_dirs[0] != str(cache.root / a_name)  # written through a temporary folder, renamed
    time.sleep(0.02)
    cache.compile(core, "a", "CPU", {}, {"net": "a"}, estimate_bytes=1000)  # a used again: b is now oldest
    assert core.seen_dirs[-1] == str(cache.root / a_name)
    time.sleep(0.02)
    cache.compile(core, "c", "CPU", {}, {"net": "c"}, estimate_bytes=1000)
    left = _entries(cache.root)
    assert len(left) == 2 and a_name in left and b_name not in left
    assert ov_cache.folder_size(cache.root) == 2000 <= cache.limit_bytes
    assert not any(p.name.startswith(ov_cache.TMP_PREFIX) for p in cache.root.iterdir())


def test_a_variant_larger_than_the_bound_is_not_cached(tmp_path):
    cache = ov_cache.CompileCache(tmp_path / ov_cache.SUBDIR, limit_bytes=500)
    core = FakeCore(1000)
    assert cache.compile(core, "unet", "CPU", {"X": 1}, {"net": "unet"}, estimate_bytes=1000) == ("compiled", "unet")
    assert core.seen_dirs == [None] and not cache.root.exists()


def test_a_cached_entry_is_reused_and_its_use_recorded(tmp_path):
    cache = ov_cache.CompileCache(tmp_path / ov_cache.SUBDIR, limit_bytes=10_000)
    core = FakeCore(1000)
    cache.compile(core, "vae", "CPU", {}, {"net": "vae", "shape": [1, 4, 8, 8]}, estimate_bytes=1000)
    (entry,) = [p for p in cache.root.iterdir()]
    old = time.time() - 3600
    os.utime(entry, (old, old))
    cache.compile(core, "vae", "CPU", {}, {"net": "vae", "shape": [1, 4, 8, 8]}, estimate_bytes=1000)
    assert core.seen_dirs[1] == str(entry) and entry.stat().st_mtime > old + 3000
    cache.compile(core, "vae", "CPU", {}, {"net": "vae", "shape": [1, 4, 16, 16]}, estimate_bytes=1000)
    assert len(_entries(cache.root)) == 2  # another shape is another entry


def test_leftovers_of_a_killed_compile_are_removed(tmp_path):
    root = tmp_path / ov_cache.SUBDIR
    dead = root / f"{ov_cache.TMP_PREFIX}999999999-abc"  # no such process
    dead.mkdir(parents=True)
    (dead / "half.blob").write_bytes(b"\0" * 300)
    (root / "old-layout.blob").write_bytes(b"\0" * 200)  # the pre-folder layout's loose files
    cache = ov_cache.CompileCache(root, limit_bytes=10_000)
    assert cache.prune() == 500 and list(root.iterdir()) == []


def _build_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from export.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_prune_cache_command_trims_the_folder_cache(tiny_sd1_engine, tmp_path, capsys):
    pytest.importorskip("openvino", reason="the OpenVINO engine: pip install -e '.[export]'")
    import runtime

    folder = tmp_path / "tiny-sd1"
    shutil.copytree(tiny_sd1_engine, folder, ignore=shutil.ignore_patterns(ov_cache.SUBDIR))
    with runtime.load(folder, backend="openvino") as pipe:
        pipe.txt2img("a cat", num_inference_steps=1, progress=False)
    cache = folder / ov_cache.SUBDIR
    graphs = ov_cache.graph_bytes(folder, pipe.manifest)
    used = ov_cache.folder_size(cache)
    assert 0 < used <= ov_cache.default_limit(folder, pipe.manifest)  # cached within the default bound
    n_entries = len(_entries(cache))
    with runtime.load(folder, backend="openvino") as pipe:  # a second process-like load reuses them
        pipe.txt2img("a cat", num_inference_steps=1, progress=False)
    assert len(_entries(cache)) == n_entries  # reused: no new entry
    assert ov_cache.folder_size(cache) <= ov_cache.default_limit(folder, pipe.manifest)

    rc, out, err = _build_cli(["--prune-cache", folder, "--cache-limit-gb", 0], capsys)
    assert rc == 0, err
    assert f"freed {used / 1e6:.1f} MB, 0.0 MB left" in out and _entries(cache) == []


def test_prune_cache_refuses_a_cache_that_leads_outside(tiny_sd1_engine, tmp_path, capsys):
    folder, elsewhere = tmp_path / "tiny-sd1", tmp_path / "precious"
    shutil.copytree(tiny_sd1_engine, folder, ignore=shutil.ignore_patterns(ov_cache.SUBDIR))
    (elsewhere / "entry").mkdir(parents=True)
    (elsewhere / "entry" / "keep.txt").write_text("mine")
    (folder / ov_cache.SUBDIR).symlink_to(elsewhere)
    rc, _, err = _build_cli(["--prune-cache", folder, "--cache-limit-gb", 0], capsys)
    assert rc == 1 and "leads outside the folder" in err
    assert (elsewhere / "entry" / "keep.txt").read_text() == "mine"
    assert _build_cli(["--prune-cache", tmp_path / "nothing-here"], capsys)[0] == 1

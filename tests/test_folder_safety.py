"""Engine folders from strangers (issue 18): containment, integrity, one error kind per failure, no
code from the folder, memory limits, atomic caches.

Containment cases put a FIFO outside the folder where the folder points: opening it for reading would
block until a writer comes. Each load runs in a thread with a deadline; a load still running at the
deadline opened the FIFO (the test then unblocks it and fails), so a load that returns, refused,
proves nothing outside was opened, without strace."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

import runtime
from runtime.errors import EngineLoadError, IntegrityError, ManifestError, PipelineError
from runtime.folder.paths import FINGERPRINT_SPAN, check_folder, fingerprint, inside
from runtime.folder.manifest import load_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
CPU_BACKENDS = ("onnxruntime", "openvino", "torch")
DEADLINE_S = 60  # a refused load takes well under a second; a load blocked on the FIFO never returns


@pytest.fixture
def folder(tiny_sd1_engine, tmp_path) -> Path:
    return shutil.copytree(tiny_sd1_engine, tmp_path / "engine")


@pytest.fixture
def fifo(tmp_path) -> Path:
    """A FIFO outside the engine folder: opening it to read blocks until a writer opens it."""
    path = tmp_path / "outside" / "secret"
    path.parent.mkdir()
    os.mkfifo(path)
    return path


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _load_within_deadline(fifo: Path, **kwargs):
    """runtime.load(**kwargs) in a thread; returns the exception it raised (None: it loaded). Fails if
    the load is still running at the deadline: it is blocked reading the FIFO outside the folder."""
    outcome: dict[str, BaseException | None] = {}

    def target() -> None:
        try:
            runtime.load(calibrate=False, **kwargs).close()
            outcome["error"] = None
        except BaseException as e:  # reported to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # let the blocked reader go
        os.close(fd)
        thread.join(DEADLINE_S)
        pytest.fail(f"the load opened {fifo}, outside the engine folder (it blocked on the FIFO)")
    return outcome["error"]


def _refused(fifo: Path, folder: Path, backend: str, match: str) -> ManifestError:
    error = _load_within_deadline(fifo, engine_dir=folder, backend=backend)
    assert isinstance(error, ManifestError), repr(error)
    assert error.__class__ is ManifestError  # containment, not an integrity mismatch
    assert match in str(error), str(error)
    return error


# --- containment --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_relative_dotdot_path_is_refused(folder, fifo, backend):
    _edit_manifest(folder, lambda d: d["networks"]["unet"].update(file="../outside/secret"))
    _refused(fifo, folder, backend, "network 'unet' names file '../outside/secret': it has a '..' component")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_absolute_path_is_refused(folder, fifo, backend):
    _edit_manifest(folder, lambda d: d["networks"]["unet"].update(file=str(fifo)))
    _refused(fifo, folder, backend, f"network 'unet' names file '{fifo}': an absolute path")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_symlink_out_of_the_folder_is_refused(folder, fifo, backend):
    (folder / "unet.onnx").unlink()
    (folder / "unet.onnx").symlink_to(fifo)
    _refused(fifo, folder, backend, f"network 'unet' names file 'unet.onnx': it leads outside the folder (to {fifo})")


def _externalize(folder: Path, location: str) -> None:
    """Move the U-Net's largest initializer to external data named `location`, as a stranger's graph
    may, and re-record the files table so that only the graph's own reference is in question."""
    model = onnx.load(str(folder / "unet.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = tensor.raw_data
    (folder / "weights.bin").write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(folder / "unet.onnx"))
    write_manifest(folder, load_manifest(folder), record_files=True)


@pytest.mark.parametrize("location, match", [
    ("../outside/secret", "it has a '..' component"),
    ("ABSOLUTE", "an absolute path"),
    ("link.bin", "it leads outside the folder"),
    ("*/_ORT_MEM_ADDR_/*", "which is missing"),  # ONNX Runtime's in-memory marker: a raw address
])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_external_data_leading_out_of_the_folder_is_refused(folder, fifo, backend, location, match):
    (folder / "link.bin").symlink_to(fifo)
    location = str(fifo) if location == "ABSOLUTE" else location
    _externalize(folder, location)
    error = _refused(fifo, folder, backend, match)
    assert "of unet.onnx names external data" in str(error)


def test_external_data_inside_the_folder_loads_and_matches(folder, tiny_sd1_engine):
    _externalize(folder, "weights.bin")
    feeds = {"sample": np.ones((1, 4, 8, 8), np.float32), "timestep": np.full(1, 500, np.float32),
             "encoder_hidden_states": np.ones((1, 77, 32), np.float32)}
    with runtime.load(folder, backend="onnxruntime", calibrate=False) as moved, \
            runtime.load(tiny_sd1_engine, backend="onnxruntime", calibrate=False) as original:
        np.testing.assert_array_equal(moved.engines["unet"].run(feeds)["noise_pred"],
                                      original.engines["unet"].run(feeds)["noise_pred"])


def test_tokenizer_files_and_cache_folders_leading_out_are_refused(folder, fifo, tmp_path):
    (folder / "tokenizer" / "added_tokens.json").symlink_to(fifo)  # transformers reads what it finds there
    _refused(fifo, folder, "onnxruntime", "the tokenizer folder holds 'tokenizer/added_tokens.json': it leads outside")
    (folder / "tokenizer" / "added_tokens.json").unlink()
    shutil.rmtree(folder / "openvino-cache", ignore_errors=True)  # a cache other tests' loads left in the fixture
    (folder / "openvino-cache").symlink_to(tmp_path / "outside", target_is_directory=True)
    _refused(fifo, folder, "openvino", "the engine cache folder 'openvino-cache': it leads outside")


def test_tokenizer_config_naming_a_file_is_refused(folder, fifo):
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_file": str(fifo)}))
    write_manifest(folder, load_manifest(folder), record_files=True)
    error = _refused(fifo, folder, "onnxruntime", "names files to read (vocab_file)")
    assert "tokenizer_config.json" in str(error)


def test_a_fifo_inside_the_folder_is_not_opened(folder, fifo):
    (folder / "vae_decoder.onnx").unlink()
    os.mkfifo(folder / "vae_decoder.onnx")
    _refused(folder / "vae_decoder.onnx", folder, "onnxruntime", "which is not a regular file")


def test_engines_opened_directly_refuse_paths_out_of_the_folder(folder, fifo):
    from dataclasses import replace

    from runtime.engines import onnxruntime as ort_engine
    from runtime.engines import openvino as ov_engine

    manifest = load_manifest(folder)
    bad = replace(manifest, networks={**manifest.networks, "unet": {**manifest.networks["unet"], "file": str(fifo)}})
    for module in (ort_engine, ov_engine):
        with pytest.raises(ManifestError, match="an absolute path"):
            module.open_engine(folder, bad, "unet")


def test_tensorrt_plan_paths_are_contained(folder):
    from dataclasses import replace

    from runtime.engines.tensorrt import StalePlanError, _plan_and_key

    manifest = load_manifest(folder)
    (folder / "tensorrt").mkdir(exist_ok=True)  # test_ort_gpu may have left its ORT cache there
    (folder / "tensorrt" / "unet.key.json").write_text("{}")

    def with_plan(plan: str):
        entry = {"networks": {"unet": {"plan": plan, "key": "tensorrt/unet.key.json"}}}
        return replace(manifest, backends={"tensorrt": entry})

    with pytest.raises(ManifestError, match="the TensorRT unet entry names plan '../../etc/hostname': it has a '..'"):
        _plan_and_key(folder, with_plan("../../etc/hostname"), "unet")
    with pytest.raises(ManifestError, match="an absolute path"):
        _plan_and_key(folder, with_plan("/etc/hostname"), "unet")
    with pytest.raises(StalePlanError, match="is missing"):  # a missing plan stays a stale plan (another backend runs)
        _plan_and_key(folder, with_plan("tensorrt/unet.plan"), "unet")
    (folder / "tensorrt" / "unet.plan").write_bytes(b"plan")
    entry = with_plan("tensorrt/unet.plan")
    entry.backends["tensorrt"]["networks"]["unet"]["key_hash"] = "0123456789abcdef"
    with pytest.raises(StalePlanError, match="is not the one the manifest records"):
        _plan_and_key(folder, entry, "unet")


def test_inside_refuses_each_kind_of_escape(tmp_path):
    root = tmp_path / "f"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.onnx").write_bytes(b"x")
    (root / "in.onnx").symlink_to(root / "sub" / "a.onnx")  # a symlink that stays inside is fine
    assert inside(root, "sub/a.onnx", "x") == root / "sub" / "a.onnx"
    assert inside(root, "./sub//a.onnx", "x") == root / "sub" / "a.onnx"
    assert inside(root, "in.onnx", "x") == root / "in.onnx"
    for rel, match in [("", "not a non-empty"), (7, "not a non-empty"), ("sub/../a", "'..'"), ("C:/x", "absolute"),
                       ("sub\\a.onnx", "backslash"), ("a\0b", "NUL"), ("//etc/passwd", "absolute"), (".", "itself"),
                       ("sub", "not a regular file")]:
        with pytest.raises(ManifestError, match=match):
            inside(root, rel, "x")


# --- integrity ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_truncated_unet_is_an_integrity_error_on_every_backend(folder, backend):
    data = (folder / "unet.onnx").read_bytes()
    (folder / "unet.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match=rf"unet.onnx has {len(data) // 2} bytes, the manifest records {len(data)}"):
        runtime.load(folder, backend=backend, calibrate=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_replaced_unet_is_an_integrity_error_on_every_backend(folder, backend):
    original = (folder / "unet.onnx").read_bytes()
    shutil.copy(folder / "vae_decoder.onnx", folder / "unet.onnx")  # another valid graph
    with pytest.raises(IntegrityError, match=rf"unet.onnx has \d+ bytes, the manifest records {len(original)}"):
        runtime.load(folder, backend=backend, calibrate=False)
    for at in (100, len(original) - 100):  # same size, one byte changed in the first or the last MiB
        data = bytearray(original)
        data[at] ^= 0xFF
        (folder / "unet.onnx").write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match="unet.onnx differs from the file the manifest records"):
            runtime.load(folder, backend=backend, calibrate=False)


def _flip_a_weight_byte_between_the_fingerprinted_ends(path: Path) -> None:
    """Change one byte of a weight, away from the first and last MiB (the graph still parses)."""
    data = bytearray(path.read_bytes())
    middles = []
    for tensor in onnx.load(str(path)).graph.initializer:
        if len(tensor.raw_data) >= 64:
            middles.append(bytes(data).find(tensor.raw_data) + len(tensor.raw_data) // 2)
    middle = next(m for m in middles if FINGERPRINT_SPAN <= m < len(data) - FINGERPRINT_SPAN)
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_single_changed_byte_needs_verify(folder):
    before = fingerprint(folder / "unet.onnx")
    _flip_a_weight_byte_between_the_fingerprinted_ends(folder / "unet.onnx")
    assert fingerprint(folder / "unet.onnx") == before  # the default mode cannot see it: documented
    runtime.load(folder, backend="onnxruntime", calibrate=False).close()
    with pytest.raises(IntegrityError, match="unet.onnx does not match its sha256 in the manifest"):
        runtime.load(folder, backend="onnxruntime", calibrate=False, verify=True)
    with pytest.raises(IntegrityError, match="unet.onnx does not match its sha256"):
        runtime.load(folder, backend="torch", calibrate=False, verify=True)


def test_check_folder_reports_what_it_read(folder):
    manifest = load_manifest(folder)
    files = sorted(manifest.files)
    assert "unet.onnx" in files and "tokenizer/vocab.json" in files
    quick = check_folder(folder, manifest)
    full = check_folder(folder, manifest, verify=True)
    sizes = [manifest.files[rel]["size"] for rel in files]
    assert (quick.mode, quick.files, quick.bytes_read) == ("fingerprint", len(files),
                                                           sum(min(s, 2 * FINGERPRINT_SPAN) for s in sizes))
    assert (full.mode, full.bytes_read) == ("sha256", sum(sizes) + quick.bytes_read)


def test_a_legacy_folder_loads_with_a_warning_and_verify_records_its_table(folder, caplog):
    from export.cli import main as build_engine_main

    _edit_manifest(folder, lambda d: d.pop("files"))
    with caplog.at_level(logging.WARNING, logger="runtime.folder.paths"):
        runtime.load(folder, backend="onnxruntime", calibrate=False).close()
    assert "predates file fingerprints" in caplog.text
    data = (folder / "vae_encoder.onnx").read_bytes()
    (folder / "vae_encoder.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert build_engine_main(["--verify", str(folder)]) == 1  # a legacy folder with a changed file: refused
    (folder / "vae_encoder.onnx").write_bytes(data)
    assert build_engine_main(["--verify", str(folder)]) == 0
    table = load_manifest(folder).files
    assert table["unet.onnx"]["size"] == (folder / "unet.onnx").stat().st_size
    assert table["unet.onnx"]["fingerprint"] == fingerprint(folder / "unet.onnx")


def test_build_engine_verify_names_the_changed_file(folder, capsys):
    from export.cli import main as build_engine_main

    assert build_engine_main(["--verify", str(folder)]) == 0
    assert "every file matches its sha256" in capsys.readouterr().out
    _flip_a_weight_byte_between_the_fingerprinted_ends(folder / "unet.onnx")
    assert build_engine_main(["--verify", str(folder)]) == 1
    assert "unet.onnx does not match its sha256 in the manifest" in capsys.readouterr().err


def test_external_data_shorter_than_its_references_is_refused_in_a_legacy_folder(folder):
    _externalize(folder, "weights.bin")
    _edit_manifest(folder, lambda d: d.pop("files"))
    data = (folder / "weights.bin").read_bytes()
    (folder / "weights.bin").write_bytes(data[:-4])
    with pytest.raises(IntegrityError, match=rf"reads bytes up to {len(data)} of weights.bin, which has {len(data) - 4}"):
        runtime.load(folder, backend="openvino", calibrate=False)


# --- one kind of error per failure -------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"\x08\x07garbage, not a protobuf" * 10, "TRUNCATED"])
def test_openvino_reads_onnx_with_the_onnx_frontend_only(tiny_sd1_engine, tmp_path, capfd, content):
    """Core.read_model tried every frontend on a file the ONNX parser refused: TensorFlow's text-format
    parser printed to stderr and a raw RuntimeError came out."""
    from runtime.engines.openvino import OpenVinoEngine
    from runtime.folder.networks import network_io

    data = (tiny_sd1_engine / "unet.onnx").read_bytes()
    bad = tmp_path / "unet.onnx"
    bad.write_bytes(data[: len(data) // 2] if content == "TRUNCATED" else content)
    dims = load_manifest(tiny_sd1_engine).dims
    with pytest.raises(EngineLoadError, match=r"unet: OpenVINO \(onnx frontend\) cannot read .*unet.onnx: it is corrupt"):
        OpenVinoEngine(bad, "unet", *network_io("unet", dims), cache_dir=None)
    err = capfd.readouterr().err
    assert "tensorflow" not in err.lower() and "text-format" not in err


def test_openvino_refuses_other_file_types(tmp_path):
    from runtime.engines.openvino import read_model

    (tmp_path / "model.pb").write_bytes(b"\n\x03abc")
    with pytest.raises(EngineLoadError, match=r"model.pb is neither an ONNX graph \(.onnx\) nor OpenVINO IR"):
        read_model(tmp_path / "model.pb", "unet")


def test_openvino_reads_ir_with_the_ir_frontend(tiny_sd1_engine, tmp_path):
    import openvino as ov

    from runtime.engines.openvino import read_model

    ov.save_model(ov.Core().read_model(str(tiny_sd1_engine / "vae_decoder.onnx")), str(tmp_path / "vd.xml"),
                  compress_to_fp16=False)
    model = read_model(tmp_path / "vd.xml", "vae_decoder")
    assert [p.get_any_name() for p in model.inputs] == ["latent"]
    (tmp_path / "vd.bin").write_bytes((tmp_path / "vd.bin").read_bytes()[:100])
    with pytest.raises(EngineLoadError, match=r"OpenVINO \(ir frontend\) cannot read .*vd.xml"):
        read_model(tmp_path / "vd.xml", "vae_decoder")


# --- no code from the folder ------------------------------------------------------------------------------

def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            out.append((f"{owner}.{name}" if owner else name, node))
    return out


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "torch"}


def test_no_pickle_or_dynamic_code_on_the_runtime_path():
    offenders = []
    files = sorted((ROOT / "runtime").rglob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text())
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                offenders += [(rel, f"import {n}") for n in names if n.split(".")[0] in PICKLE_MODULES]
        for name, call in _calls(tree):
            keywords = {k.arg: k.value for k in call.keywords}
            builtin = isinstance(call.func, ast.Name) and name in ("eval", "exec", "compile", "__import__")
            if builtin or name.endswith(("load_library", "LoadLibrary", "init_libnvinfer_plugins")):
                offenders.append((rel, name))
            if name.split(".")[-1] == "load" and "allow_pickle" in keywords:
                offenders.append((rel, f"{name}(allow_pickle=...)"))
            if "trust_remote_code" in keywords:
                offenders.append((rel, "trust_remote_code"))
            # CDLL(None) opens no file: the symbols already in the process (libc's madvise in
            # runtime/engines/mapped_weights.py)
            own_symbols = bool(call.args) and isinstance(call.args[0], ast.Constant) and call.args[0].value is None
            if name.endswith("CDLL") and rel != "runtime/engines/ort_tensorrt.py" and not own_symbols:
                offenders.append((rel, name))  # TensorRT's own libraries, by fixed names, only there
    assert len(files) > 20 and offenders == []


def test_tensorrt_libraries_are_loaded_by_fixed_names_only():
    from runtime.engines import ort_tensorrt

    tree = ast.parse((ROOT / "runtime/engines/ort_tensorrt.py").read_text())
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)
             and any(name.endswith("CDLL") for name, _ in _calls(n))]
    assert [ast.unparse(n.iter) for n in loops] == ["TENSORRT_LIBRARIES"]
    assert all(isinstance(name, str) and "/" not in name for name in ort_tensorrt.TENSORRT_LIBRARIES)


def test_torch_load_is_the_only_pickle_reader_and_only_with_weights_only():
    readers = []
    for path in sorted((ROOT / "export").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for name, call in _calls(ast.parse(path.read_text())):
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "numpy.load", "np.load", "joblib.load"):
                readers.append((rel, name, "forbidden"))
            elif name == "torch.load":
                weights_only = {k.arg: k.value for k in call.keywords}.get("weights_only")
                ok = isinstance(weights_only, ast.Constant) and weights_only.value is True
                readers.append((rel, name, "weights_only=True" if ok else "UNSAFE"))
    assert readers and all(kind == "weights_only=True" for _, _, kind in readers), readers


# --- resource limits -------------------------------------------------------------------------------------

def test_requests_over_the_memory_limit_are_refused_before_running(tiny_sd1_engine):
    from runtime.memory import machine_memory

    with runtime.load(tiny_sd1_engine, backend="onnxruntime", calibrate=False) as pipe:
        assert pipe.limits.max_memory == machine_memory() > 1 << 30
        small = pipe.limits.memory.estimate(1, 64, 64, guided=True, encodes=False)
        big = pipe.limits.memory.estimate(4, 128, 128, guided=True, encodes=False)
        assert small < big < 1 << 30  # a tiny model estimates tiny
    limit_gb = (small + big) / 2 / (1 << 30)
    with runtime.load(tiny_sd1_engine, backend="onnxruntime", calibrate=False, max_memory_gb=limit_gb) as pipe:
        calls = []
        pipe.engines["unet"].run = lambda feeds: calls.append(feeds)  # nothing may run
        with pytest.raises(PipelineError, match=r"4 image\(s\) of 128x128 with guidance need about [\d.]+ [MG]iB .* "
                                                r"more than the limit of [\d.]+ [MG]iB \(max_memory_gb"):
            pipe.txt2img("a cat", height=128, width=128, num_images_per_prompt=4, num_inference_steps=2)
        one = pipe.request("txt2img", "a cat", height=128, width=128, num_inference_steps=2, seed=1)
        with pytest.raises(PipelineError, match=r"4 image\(s\) of 128x128"):  # a batch of requests counts as one
            pipe.generate([one] * 4, progress=False)
        assert calls == []
        del pipe.engines["unet"].run
        assert pipe.txt2img("a cat", num_inference_steps=2, seed=0, output_type="np", progress=False).images.shape \
            == (1, 64, 64, 3)
    for bad in (0, -1, "8", True):
        with pytest.raises(PipelineError, match="max_memory_gb must be a positive number"):
            runtime.load(tiny_sd1_engine, backend="onnxruntime", max_memory_gb=bad)


def test_a_whole_image_vae_pass_over_the_limit_decodes_in_tiles(tiny_sd1_engine, monkeypatch):
    """With vae_tiling left to the runtime, an image whose whole-image VAE pass would not fit the
    memory limit but whose tiled pass would is decoded in tiles (the same pixels as asking for those
    tiles), not refused; vae_tiling=False still refuses it."""
    from runtime import request as request_module

    monkeypatch.setattr(request_module, "DEFAULT_TILE", 8)  # tiles of 8 latent pixels: the tiny model's 128 px tiles
    with runtime.load(tiny_sd1_engine, backend="onnxruntime", calibrate=False) as pipe:
        whole = pipe.limits.memory.estimate(1, 128, 128, guided=True, encodes=False)
        tiled = pipe.limits.memory.estimate(1, 128, 128, guided=True, encodes=False, vae_tile=8)
        assert tiled < whole
        asked = pipe.txt2img("a cat", height=128, width=128, num_inference_steps=2, seed=3, vae_tiling=True,
                             output_type="np", progress=False).images
        plain = pipe.txt2img("a cat", height=128, width=128, num_inference_steps=2, seed=3, output_type="np",
                             progress=False).images
    with runtime.load(tiny_sd1_engine, backend="onnxruntime", calibrate=False,
                      max_memory_gb=(tiled + whole) / 2 / (1 << 30)) as pipe:
        assert pipe.request("txt2img", "a cat", height=128, width=128, num_inference_steps=2).vae_tile == 8
        auto = pipe.txt2img("a cat", height=128, width=128, num_inference_steps=2, seed=3, output_type="np",
                            progress=False).images
        with pytest.raises(PipelineError, match=r"1 image\(s\) of 128x128 with guidance need about .* max_memory_gb"):
            pipe.txt2img("a cat", height=128, width=128, num_inference_steps=2, vae_tiling=False)
        assert pipe.request("txt2img", "a cat", height=64, width=64, num_inference_steps=2).vae_tile is None
    np.testing.assert_array_equal(auto, asked)
    assert not np.array_equal(auto, plain)  # the tiles' seams blend: a tiled decode is not the whole one


def test_the_estimate_follows_the_architecture(tiny_sd1_engine, tiny_sdxl_engine):
    """SDXL's estimate counts both text encoders, puts U-Net attention at its first attention level
    (a quarter of the latent positions) and scales the VAE term by the VAE's own size."""
    from runtime.families import family_of
    from runtime.folder.manifest import load_manifest
    from runtime.memory import MemoryModel

    for folder in (tiny_sd1_engine, tiny_sdxl_engine):
        manifest = load_manifest(folder)
        model = MemoryModel.from_folder(folder, manifest, "onnxruntime")
        encoders = [e.network for e in family_of(manifest.family).text_encoders]
        sizes = {n: sum((folder / f).stat().st_size for f in {e["file"], e.get("external_data")} - {None})
                 for n, e in manifest.networks.items()}
        assert model.weights == sum(sizes[n] for n in encoders + ["unet", "vae_decoder"])
        assert model.vae_scale == pytest.approx((sizes["vae_decoder"] / 4 / 49_490_199) ** 0.5, rel=1e-6)
    assert encoders == ["text_encoder", "text_encoder_2"] and model.attention_level == 1
    # Full-size SDXL's weights with the formula: attention of 1024 x 1024 at 64 x 64 positions, not 128 x 128
    sdxl = MemoryModel(weights=13_740_000_000, encoder_weights=136_700_000, scale=(2_567_463_684 / 859_520_964) ** 0.5,
                       backend="openvino", attention_level=1)
    sd15_like = MemoryModel(weights=13_740_000_000, encoder_weights=136_700_000, scale=sdxl.scale, backend="openvino")
    unet_only = dict(guided=True, encodes=False, vae_tile=64)
    gap = sd15_like.estimate(1, 1024, 1024, **unet_only) - sdxl.estimate(1, 1024, 1024, **unet_only)
    assert gap == pytest.approx(1.15 * sdxl.scale * 2 * 70 * (16384 ** 2 - 4096 ** 2), rel=1e-6)


def test_the_estimate_covers_measured_sd15_peaks():
    """The peaks measured on SD 1.5 (docs/security.md; one-step txt2img, the larger of ONNX Runtime
    and OpenVINO f32) lie below the estimate for SD 1.5's weights."""
    from runtime.memory import MemoryModel

    measured = json.loads((ROOT / "benchmarks" / "results" / "memory-sd15.json").read_text())
    assert {r["backend"] for r in measured["runs"]} == {"onnxruntime", "openvino"}
    for run in measured["runs"]:
        sd15 = MemoryModel(weights=492_049_289 + 1_794_141 + 3_437_361_920 + 198_022_917,
                           encoder_weights=136_723_796, scale=1.0, backend=run["backend"])
        estimate = sd15.estimate(run["batch"], run["size"], run["size"], guided=True, encodes=False)
        assert run["peak"] < estimate < 1.6 * run["peak"], run


def test_the_estimate_covers_measured_sdxl_peaks():
    """Full-size SDXL's peaks (benchmarks/results/memory-sdxl.json: OpenVINO f32 and ONNX Runtime at 512
    and 1024 px) lie below the estimate for its folder's weights, and its 1024 px image fits a 24 GB
    machine's limit (the fit before the refit estimated 83 GiB). OpenVINO bf16 holds half the
    weights, which the estimate (it does not know the precision) does not count."""
    from runtime.memory import MemoryModel

    measured = json.loads((ROOT / "benchmarks" / "results" / "memory-sdxl.json").read_text())
    runs = [r for r in measured["runs"] if r.get("inference_precision", "f32") == "f32"]
    assert {(r["backend"], r["size"]) for r in runs} == {(b, s) for b in ("onnxruntime", "openvino") for s in (512, 1024)}
    for run in runs:
        sdxl = MemoryModel(weights=measured["weights_bytes"], encoder_weights=136_727_881,
                           scale=(2_567_463_684 / 859_520_964) ** 0.5, backend=run["backend"], attention_level=1)
        estimate = sdxl.estimate(run["batch"], run["size"], run["size"], guided=True, encodes=False)
        assert run["peak"] < estimate < 1.6 * run["peak"], run
        assert estimate < 23 * (1 << 30)


# --- atomic caches ---------------------------------------------------------------------------------------------

def test_an_interrupted_ort_cache_write_never_reaches_the_next_load(tiny_sd1_engine, tmp_path, monkeypatch):
    from runtime.engines import onnxruntime as ort_engine

    manifest = load_manifest(tiny_sd1_engine)

    def killed(pending):  # the process dies after ORT wrote the optimized graph, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(ort_engine, "_publish_cache", killed)
    with pytest.raises(KeyboardInterrupt):
        ort_engine.open_engine(tiny_sd1_engine, manifest, "vae_decoder", providers=["cpu"], cache_dir=tmp_path)
    assert [p.name for p in tmp_path.glob("vae_decoder-*.onnx")] == []  # nothing under the name a load reads
    assert list(tmp_path.glob(".vae_decoder-*.tmp"))  # the partial write stayed under its temporary name
    monkeypatch.undo()
    feeds = {"latent": np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)}
    cached = ort_engine.open_engine(tiny_sd1_engine, manifest, "vae_decoder", providers=["cpu"], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("vae_decoder-*.onnx"))) == 1
    again = ort_engine.open_engine(tiny_sd1_engine, manifest, "vae_decoder", providers=["cpu"], cache_dir=tmp_path)
    plain = ort_engine.open_engine(tiny_sd1_engine, manifest, "vae_decoder", providers=["cpu"])
    for engine in (cached, again):
        np.testing.assert_allclose(engine.run(feeds)["image"], plain.run(feeds)["image"], rtol=1e-5, atol=1e-6)


def test_tensorrt_plan_writes_are_atomic(tmp_path, monkeypatch):
    from export import tensorrt as trt_build

    plan = tmp_path / "unet.0123456789abcdef.plan"
    plan.write_bytes(b"the old plan")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the write fails before it is durable
    with pytest.raises(OSError, match="No space left"):
        trt_build._atomic_write(plan, b"half a new plan")
    assert plan.read_bytes() == b"the old plan" and sorted(tmp_path.iterdir()) == [plan]
    monkeypatch.undo()
    trt_build._atomic_write(plan, memoryview(b"the new plan"))
    assert plan.read_bytes() == b"the new plan" and sorted(tmp_path.iterdir()) == [plan]

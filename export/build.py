"""`build-engine`: turn a model (preset, diffusers folder or single-file checkpoint) into an engine
folder: the four ONNX graphs, the tokenizer files and `manifest.json` (runtime/manifest.py), plus
the plans of a backend that needs its own (TensorRT).

    build-engine sd15.safetensors --out engines/sd15 --precision fp16 --backend tensorrt
    build-engine sd15.safetensors --out engines/sd15-int8 --quantize int8   # + int8 U-Net for OpenVINO

The build is atomic: everything is written into a temporary sibling folder `.DIR.tmp-PID-XXXX`,
and renamed over DIR only once every graph has passed its parity check. A build killed midway
leaves the old folder as it was; the next run removes the stale temporary folder. A folder whose
manifest already matches the request (source sha256, precision, shape range, prediction type, tool
versions, every file's sha256) is reused as is unless `force=True`. `--quantize int8` adds an int8
U-Net for the OpenVINO engine (export/quantize.py); asked of an up-to-date folder, it quantizes in
place without exporting again, and a later build without `--quantize` removes it again.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from export.hashing import file_sha256, tree_sha256
from runtime.engines.openvino import int8_unet
from runtime.manifest import MANIFEST_NAME, PREDICTION_TYPES, Manifest, ManifestError, load_manifest, write_manifest
from runtime.networks import NETWORKS, PRECISIONS

BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch")
Progress = Callable[[str], Any]


class BuildError(RuntimeError):
    """The request cannot be built (bad source, shape range or output folder, backend failure)."""


# --- hashing and source identity -------------------------------------------------------------------

def source_identity(source: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """What the manifest records of a source, computed without loading it: kind, path, sha256 (of
    the file, of the folder's files, or, for random presets, of the preset's config and seed)."""
    from export.configs import PRESETS, preset
    from export.loading import TINY_DIR, CheckpointError

    name = str(source)
    path = Path(source).expanduser()
    if name == "tiny" and not path.exists():
        if not (TINY_DIR / "model_index.json").is_file():
            raise CheckpointError(f"the embedded demo model is not built yet ({TINY_DIR} has no model_index.json); "
                                  f"use a random preset: {', '.join(PRESETS)}")
        return {"kind": "preset", "preset": "tiny", "path": str(TINY_DIR), "sha256": tree_sha256(TINY_DIR)}
    if name in PRESETS and not path.exists():
        config = json.dumps({"spec": asdict(preset(name)), "seed": seed}, sort_keys=True, default=str)
        return {"kind": "preset", "preset": name, "seed": seed, "path": None,
                "sha256": hashlib.sha256(config.encode()).hexdigest()}
    if path.is_dir():
        return {"kind": "diffusers", "path": str(path.resolve()), "sha256": tree_sha256(path)}
    if path.is_file():
        return {"kind": "single_file", "path": str(path.resolve()), "sha256": file_sha256(path)}
    raise CheckpointError(f"{path} does not exist, and {name!r} is not a preset "
                          f"(presets: {', '.join(PRESETS)}, tiny)")


def load_source(identity: dict[str, Any], prediction_type: str | None = None) -> Any:
    """The `LoadedModel` an identity from `source_identity` names (random presets with its seed)."""
    from export.loading import load_model, random_model

    if identity["kind"] == "preset" and identity.get("preset") != "tiny":
        model = random_model(identity["preset"], seed=identity["seed"])
    else:
        model = load_model(identity["path"], prediction_type=prediction_type)
    if prediction_type is not None:
        model.spec = replace(model.spec, scheduler={**model.spec.scheduler, "prediction_type": prediction_type})
    return model


def tool_versions() -> dict[str, str]:
    from export.onnx_export import EXPORTER

    versions = {"python": platform.python_version(), "exporter": EXPORTER}
    for dist in ("sd-runtime", "torch", "onnx", "onnxruntime", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


# --- engine folder ---------------------------------------------------------------------------------

def _folder_files(manifest: Manifest) -> dict[str, str]:
    """Relative path -> sha256 of every file the manifest vouches for."""
    files = {}
    for entry in manifest.networks.values():
        files[entry["file"]] = entry["sha256"]
        if entry.get("external_data"):
            files[entry["external_data"]] = entry["external_data_sha256"]
    tok_dir = manifest.tokenizer.get("dir", "tokenizer")
    for name, digest in manifest.tokenizer.get("files", {}).items():
        files[f"{tok_dir}/{name}"] = digest
    int8 = int8_unet(manifest)
    if int8:
        files[int8["file"]] = int8["sha256"]
        files[int8["weights"]] = int8["weights_sha256"]
    return files


def _same_source(recorded: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Same weights and options; the path may have moved."""
    return all(recorded.get(k) == v for k, v in identity.items() if k != "path")


def _reuse_problem(out_dir: Path, identity: dict[str, Any], precision: str, shapes: dict[str, int],
                   tools: dict[str, str], backend: str) -> str | None:
    """Why the folder at `out_dir` cannot serve this request, or None if it can as it is."""
    try:
        manifest = load_manifest(out_dir)
    except ManifestError as e:
        return str(e)
    if not _same_source(manifest.source, identity):
        keys = [k for k, v in identity.items() if k != "path" and manifest.source.get(k) != v]
        return f"the source differs ({', '.join(keys)}: folder {[manifest.source.get(k) for k in keys]}, " \
               f"request {[identity[k] for k in keys]})"
    for key, have, want in (("precision", manifest.precision, precision), ("shapes", manifest.shapes, shapes),
                            ("tools", manifest.tools, tools)):
        if have != want:
            return f"{key}: the folder has {have!r}, the request {want!r}"
    if set(manifest.networks) != set(NETWORKS):
        return f"it lacks networks {sorted(set(NETWORKS) - set(manifest.networks))}"
    if backend == "tensorrt" and "tensorrt" not in manifest.backends:
        return "it has no TensorRT plans"
    try:
        for rel, digest in _folder_files(manifest).items():
            if file_sha256(out_dir / rel) != digest:
                return f"{rel} does not match its sha256 in the manifest"
    except (OSError, KeyError) as e:
        return f"cannot verify its files: {e}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out_dir: Path, progress: Progress) -> None:
    """Remove temporary folders of builds into `out_dir` whose process is gone; if a build died
    between its two renames (old folder moved aside, new one not yet in place), move the old back."""
    for kind in ("old", "tmp"):
        for p in sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*")):
            try:
                pid = int(p.name.rsplit("-", 2)[-2])
            except (ValueError, IndexError):
                continue
            if pid != os.getpid() and _pid_alive(pid):
                continue
            if kind == "old" and not out_dir.exists():
                p.rename(out_dir)
                progress(f"restored {out_dir} from an interrupted build's {p.name}")
            else:
                shutil.rmtree(p, ignore_errors=True)
                progress(f"removed stale temporary folder {p.name}")


@contextlib.contextmanager
def _stage(progress: Progress, label: str) -> Iterator[None]:
    progress(f"{label} ...")
    start = time.perf_counter()
    yield
    progress(f"{label}: done in {time.perf_counter() - start:.1f} s")


def _check_shapes(spec: Any, shapes: dict[str, int]) -> None:
    from export.onnx_export import size_multiple

    m = size_multiple(spec)
    if not 1 <= shapes["min_batch"] <= shapes["opt_batch"] <= shapes["max_batch"]:
        raise BuildError(f"batch range must satisfy 1 <= min <= opt <= max; got {shapes['min_batch']}, "
                         f"{shapes['opt_batch']}, {shapes['max_batch']}")
    if not 0 < shapes["min_image"] <= shapes["opt_image"] <= shapes["max_image"]:
        raise BuildError(f"image range must satisfy 0 < min <= opt <= max; got {shapes['min_image']}, "
                         f"{shapes['opt_image']}, {shapes['max_image']}")
    bad = [k for k in ("min_image", "opt_image", "max_image") if shapes[k] % m]
    if bad:
        raise BuildError(f"{', '.join(f'{k}={shapes[k]}' for k in bad)}: image sizes of this model must be "
                         f"multiples of {m} (VAE scale factor x U-Net downsampling)")


def build_engine(source: str | os.PathLike, out_dir: str | os.PathLike, *, backend: str = "onnxruntime",
                 precision: str = "fp32", min_image: int | None = None, opt_image: int | None = None,
                 max_image: int | None = None, min_batch: int = 1, opt_batch: int = 1, max_batch: int = 4,
                 prediction_type: str | None = None, seed: int = 0, quantize: str | None = None,
                 force: bool = False, progress: Progress = print) -> Path:
    """Build (or reuse) the engine folder `out_dir` for `source`; return its path.

    Image sizes default to half, once and twice the model's native size. `seed` seeds the random
    weights of presets. `quantize="int8"` adds the OpenVINO int8 U-Net (fp32 graphs only). Raises
    `BuildError`, `CheckpointError` (source), `ParityError` (a graph differs from PyTorch),
    `QuantizeError` or the TensorRT builder's error; `out_dir` is then left as it was."""
    if backend not in BACKENDS:
        raise BuildError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise BuildError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    if quantize is not None:
        from export.quantize import SCHEMES, is_available as quantize_available

        if quantize not in SCHEMES:
            raise BuildError(f"unknown quantization {quantize!r}; expected one of {', '.join(SCHEMES)}")
        if precision != "fp32":
            raise BuildError(f"--quantize {quantize} starts from the fp32 graphs; got --precision {precision}")
        ok, why = quantize_available()
        if not ok:
            raise BuildError(f"--quantize {quantize} is not usable on this machine: {why}")
    if backend == "tensorrt":  # fail before minutes of export, not after
        from runtime.engines.tensorrt import is_available

        ok, why = is_available()
        if not ok:
            raise BuildError(f"backend tensorrt is not usable on this machine: {why}")
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir, progress)
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise BuildError(f"{out_dir} is not empty and is not an engine folder (no {MANIFEST_NAME}); "
                         "refusing to replace it")

    from export.configs import preset

    start = time.perf_counter()
    with _stage(progress, f"hashing source {source}"):
        identity = {**source_identity(source, seed), "prediction_type": prediction_type}
    try:
        existing = load_manifest(out_dir) if (out_dir / MANIFEST_NAME).is_file() else None
    except ManifestError:
        existing = None
    same_source = existing is not None and _same_source(existing.source, identity)
    model = spec = None
    if identity["kind"] == "preset" and identity["preset"] != "tiny":
        spec = preset(identity["preset"])
        default = spec.unet.sample_size * spec.vae_scale_factor
    elif same_source:
        default = existing.default_size[0]
    else:  # sizes depend on the checkpoint's configs: load it first
        with _stage(progress, "loading model"):
            model = load_source(identity, prediction_type)
        spec = model.spec
        default = spec.unet.sample_size * spec.vae_scale_factor
    opt_image = opt_image or default
    shapes = {"min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch,
              "min_image": min_image or min(opt_image, default // 2), "opt_image": opt_image,
              "max_image": max_image or max(opt_image, default * 2)}
    if spec is not None:
        _check_shapes(spec, shapes)
    tools = tool_versions()

    if existing is not None or (out_dir / MANIFEST_NAME).is_file():
        problem = "--force given" if force else _reuse_problem(out_dir, identity, precision, shapes, tools, backend)
        if problem is None:
            if _update_quantization(out_dir, quantize, progress):
                progress(f"updated {out_dir} in {time.perf_counter() - start:.1f} s")
                return out_dir
            progress(f"up to date: {out_dir} matches the request (source, precision, shapes, quantization, tools "
                     "and every file's sha256); nothing to do")
            return out_dir
        progress(f"rebuilding {out_dir}: {problem}")

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if model is None:
            with _stage(progress, "loading model"):
                model = load_source(identity, prediction_type)
        _check_shapes(model.spec, shapes)
        manifest = _export_all(model, identity, tmp, precision, shapes, tools, progress)
        del model
        gc.collect()
        if quantize is not None:
            manifest = _quantize(tmp, manifest, quantize, progress)
        if backend == "tensorrt":
            _carry_plans(out_dir, tmp)
            manifest = _build_tensorrt(tmp, manifest, precision, progress)
        write_manifest(tmp, manifest)
        load_manifest(tmp)  # what the runtime will read
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"built {out_dir} ({backend}, {precision}{', ' + quantize + ' U-Net' if quantize else ''}) "
             f"in {time.perf_counter() - start:.1f} s")
    return out_dir


def _export_all(model: Any, identity: dict[str, Any], folder: Path, precision: str, shapes: dict[str, int],
                tools: dict[str, str], progress: Progress) -> Manifest:
    from export.onnx_export import default_parity_shapes, export_network

    spec = model.spec
    graph_precision = "fp16" if precision == "fp16" else "fp32"
    parity_shapes = default_parity_shapes(spec, shapes["min_image"], shapes["opt_image"], shapes["max_image"],
                                          shapes["max_batch"])
    networks = {}
    for network in NETWORKS:
        with _stage(progress, f"exporting {network} ({graph_precision})"):
            result = export_network(network, model, folder, precision=graph_precision, parity_shapes=parity_shapes)
        p = result.parity
        progress(f"  {network}: parity vs PyTorch fp32: max abs {p['max_abs']:.3g}, relative {p['rel']:.3g} "
                 f"(threshold {p['threshold']:g})")
        entry = {"file": result.file, "external_data": result.external_data, "precision": graph_precision,
                 "sha256": file_sha256(folder / result.file), "parity": p,
                 "export_seconds": round(result.seconds, 2)}
        if result.external_data:
            entry["external_data_sha256"] = file_sha256(folder / result.external_data)
        networks[network] = entry
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir()
    tok_files = {}
    for f in sorted(Path(model.tokenizer_dir).iterdir()):
        if f.is_file():
            shutil.copy2(f, tok_dir / f.name)
            tok_files[f.name] = file_sha256(f)
    size = spec.unet.sample_size * spec.vae_scale_factor
    return Manifest(
        family=spec.family, dims=spec.dims, scaling_factor=spec.vae.scaling_factor,
        prediction_type=spec.prediction_type, scheduler=dict(spec.scheduler),
        tokenizer={"dir": "tokenizer", "pad_token": spec.pad_token, "files": tok_files},
        default_size=(size, size), shapes=dict(shapes), precision=precision, networks=networks, backends={},
        source=identity, tools=tools, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _quantize(folder: Path, manifest: Manifest, scheme: str, progress: Progress) -> Manifest:
    from export.quantize import quantize_unet

    write_manifest(folder, manifest)  # calibration runs the folder through the runtime
    with _stage(progress, f"quantizing the U-Net ({scheme}, OpenVINO)"):
        entry = quantize_unet(folder, manifest, scheme=scheme, progress=progress)
    backends = dict(manifest.backends)
    backends["openvino"] = {**backends.get("openvino", {}), **entry}
    return replace(manifest, backends=backends)


def _update_quantization(out_dir: Path, scheme: str | None, progress: Progress) -> bool:
    """Bring an otherwise up-to-date folder's int8 U-Net in line with the request, in place: add it
    (files first, then the manifest, each replaced atomically) or remove it (manifest first).
    Returns whether anything changed."""
    manifest = load_manifest(out_dir)
    have = int8_unet(manifest)
    if (have["scheme"] if have else None) == scheme:
        return False
    if scheme is not None:
        progress(f"adding the {scheme} U-Net to {out_dir} (the graphs are up to date; no export needed)")
        write_manifest(out_dir, _quantize(out_dir, manifest, scheme, progress))
        return True
    progress(f"removing the int8 U-Net from {out_dir} (not requested; pass --quantize int8 to keep it)")
    backends = dict(manifest.backends)
    rest = {k: v for k, v in backends.pop("openvino").items() if k != "unet_int8"}
    if rest:
        backends["openvino"] = rest
    write_manifest(out_dir, replace(manifest, backends=backends))
    for rel in (have["file"], have["weights"]):
        (out_dir / rel).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (out_dir / Path(have["file"]).parent).rmdir()  # only if empty
    return True


def _carry_plans(old: Path, new: Path) -> None:
    """Hard-link the old folder's TensorRT files (plans, keys, timing cache) into the new one, so
    the TensorRT builder can reuse the plans whose keys still match. Its writes replace files
    (temporary file, then rename), so the old folder's copies stay as they were."""
    if (old / "tensorrt").is_dir():
        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        shutil.copytree(old / "tensorrt", new / "tensorrt", copy_function=link)


def _build_tensorrt(folder: Path, manifest: Manifest, precision: str, progress: Progress) -> Manifest:
    try:
        from export.tensorrt import build_tensorrt_engines
    except ImportError as e:
        raise BuildError(f"backend tensorrt: cannot import export.tensorrt: {e}") from e
    write_manifest(folder, manifest)  # the TensorRT builder may read the folder's manifest
    with _stage(progress, f"building TensorRT plans ({precision})"):
        entry = build_tensorrt_engines(folder, manifest, precision=precision, progress=progress)
    return replace(manifest, backends={**manifest.backends, "tensorrt": entry})


# --- CLI -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build-engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="diffusers folder, single-file checkpoint (.safetensors/.ckpt) or preset name "
                                       "(`tiny` = embedded demo model; other presets get random weights)")
    parser.add_argument("--out", required=True, type=Path, help="engine folder to write")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    for key in ("min-image", "opt-image", "max-image"):
        parser.add_argument(f"--{key}", type=int, default=None, help="pixels (default: from the model's size)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="also build an int8 U-Net for the OpenVINO CPU engine, calibrated on denoising runs "
                             "(needs sd-runtime[quantize]; fp32 only; faster, less exact: see docs/benchmarks.md)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    args = parser.parse_args(argv)

    from export.loading import CheckpointError
    from export.onnx_export import ParityError
    from export.quantize import QuantizeError

    def progress(line: str) -> None:
        print(line, flush=True)

    try:
        build_engine(args.source, args.out, backend=args.backend, precision=args.precision, min_image=args.min_image,
                     opt_image=args.opt_image, max_image=args.max_image, min_batch=args.min_batch,
                     opt_batch=args.opt_batch, max_batch=args.max_batch, prediction_type=args.prediction_type,
                     seed=args.seed, quantize=args.quantize, force=args.force, progress=progress)
    except (BuildError, CheckpointError, ParityError, QuantizeError, ManifestError, OSError, ValueError,
            RuntimeError) as e:
        print(f"build-engine: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

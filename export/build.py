"""The build behind `build-engine` (its command line is export/cli.py): turn a model (preset,
diffusers folder or single-file checkpoint) into an engine folder: the four ONNX graphs, the
tokenizer files and `manifest.json` (runtime/folder/manifest.py), plus the plans of a backend that
needs its own (TensorRT).

The build is atomic: everything is written into a temporary sibling folder `.DIR.tmp-PID-XXXX`,
and renamed over DIR only once every graph has passed its parity check. A build killed midway
leaves the old folder as it was; the next run removes the stale temporary folder. A folder whose
manifest already matches the request (source sha256, precision, shape range, prediction type, tool
versions, every file's sha256) is reused as is unless `force=True`. `--quantize int8` adds an int8
U-Net for the OpenVINO engine (export/quantize.py); asked of an up-to-date folder, it quantizes in
place without exporting again, and a later build without `--quantize` removes it again.
`--tiling` adds the circular-padded graphs (export/circular.py) beside the U-Net and the VAE.
`--tiny-vae PATH` adds a tiny autoencoder (TAESD; export/loading/taesd.py) beside the folder's VAE.
`--vae PATH` replaces the source's VAE with another AutoencoderKL (export/loading/vae_source.py).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import platform
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from export.adapters import Adapters, adapters as parse_adapters, comparable
from export.hashing import file_sha256, tree_sha256
from runtime.engines.ov_cache import pid_alive
from runtime.folder.manifest import MANIFEST_NAME, PREDICTION_TYPES, Manifest, ManifestError, load_manifest, write_manifest
from runtime.folder.networks import PRECISIONS, TILING_NETWORKS, required_networks
from runtime.sampling.defaults import recommended
from runtime.folder.paths import tokenizer_entries

Progress = Callable[[str], Any]
# Whether folders get the step-cache U-Nets (unet_deep, unet_shallow) unless told (--step-cache).
STEP_CACHE_DEFAULT = False


class BuildError(RuntimeError):
    """The request cannot be built (bad source, shape range or output folder, backend failure)."""


# --- hashing and source identity -------------------------------------------------------------------

def source_identity(source: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """What the manifest records of a source, computed without loading it: kind, path, sha256 (of
    the file, of the folder's files, or, for random presets, of the preset's config and seed)."""
    from export.configs import PRESETS, preset
    from export.loading.read import TINY_DIR, CheckpointError

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
    from export.loading.read import load_model, random_model

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
    for tok in tokenizer_entries(manifest.tokenizer):
        tok_dir = tok.get("dir", "tokenizer")
        for name, digest in tok.get("files", {}).items():
            files[f"{tok_dir}/{name}"] = digest
    for entry in _quantized_entries(manifest):
        files[entry["file"]] = entry["sha256"]
        files[entry["weights"]] = entry["weights_sha256"]
    return files


def _quantized_entries(manifest: Manifest) -> list[dict[str, Any]]:
    """The OpenVINO IR entries of `--quantize` (the int8 U-Net, or the int8-weight networks)."""
    entries = [manifest.int8_unet] if manifest.int8_unet else []
    return entries + list((manifest.weights_int8 or {}).get("networks", {}).values())


def _same_source(recorded: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Same weights and options, LoRAs and embeddings included (export/adapters.py); paths may have moved."""
    have, want = comparable(recorded), comparable(identity)
    return all(have.get(k) == want.get(k) for k in have.keys() | want.keys())


def _reuse_problem(out_dir: Path, identity: dict[str, Any], precision: str, shapes: dict[str, int],
                   tools: dict[str, str], tensorrt: bool, cache_branch: int | None = None,
                   tiling: bool = False) -> str | None:
    """Why the folder at `out_dir` cannot serve this request, or None if it can as it is."""
    try:
        manifest = load_manifest(out_dir)
    except ManifestError as e:
        return str(e)
    if not _same_source(manifest.source, identity):
        have, want = comparable(manifest.source), comparable(identity)
        keys = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
        return f"the source differs ({', '.join(keys)}: folder {[have.get(k) for k in keys]}, " \
               f"request {[want.get(k) for k in keys]})"
    for key, have, want in (("precision", manifest.precision, precision), ("shapes", manifest.shapes, shapes),
                            ("tools", manifest.tools, tools)):
        if have != want:
            return f"{key}: the folder has {have!r}, the request {want!r}"
    if not set(required_networks(manifest.dims)) <= set(manifest.networks):
        return f"it lacks networks {sorted(set(required_networks(manifest.dims)) - set(manifest.networks))}"
    have_branch = manifest.networks.get("unet_deep", {}).get("branch")
    if have_branch != cache_branch:
        return (f"step cache: the folder has {'none' if have_branch is None else f'branch {have_branch}'}, "
                f"the request {'none' if cache_branch is None else f'branch {cache_branch}'}")
    if all(n in manifest.networks for n in TILING_NETWORKS) != tiling:
        return f"tiling: the folder has {'no ' if tiling else ''}circular-padded graphs, the request " \
               f"{'asks for them' if tiling else 'none'}"
    if tensorrt and "tensorrt" not in manifest.backends:
        return "it has no TensorRT plans"
    try:
        for rel, digest in _folder_files(manifest).items():
            if file_sha256(out_dir / rel) != digest:
                return f"{rel} does not match its sha256 in the manifest"
    except (OSError, KeyError) as e:
        return f"cannot verify its files: {e}"
    return None


def _clean_stale(out_dir: Path, progress: Progress) -> None:
    """Remove temporary folders of builds into `out_dir` whose process is gone; if a build died
    between its two renames (old folder moved aside, new one not yet in place), move the old back."""
    for kind in ("old", "tmp"):
        for p in sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*")):
            try:
                pid = int(p.name.rsplit("-", 2)[-2])
            except (ValueError, IndexError):
                continue
            if pid != os.getpid() and pid_alive(pid):
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


@dataclass
class _Plan:
    """What a build request resolves to before any export: the source's identity, the folder's
    existing manifest (if any), the loaded model where it had to be loaded already, and the shapes."""

    identity: dict[str, Any]
    existing: Manifest | None
    model: Any
    shapes: dict[str, int]
    tools: dict[str, str]
    adapters: Adapters = Adapters()  # LoRAs and embeddings to apply before export
    tiny_vae: Any = None  # export/loading/taesd.py TinyVAESource: --tiny-vae, exported beside the VAE
    defaults: dict[str, Any] | None = None  # --default-steps / --default-guidance / --default-sampler given
    vae: Any = None  # export/loading/vae_source.py VAESource: --vae, exported in place of the source's VAE


# long: the public entry point; most of its lines are the docstring naming every option
def build_engine(source: str | os.PathLike, out_dir: str | os.PathLike, *, tensorrt: bool = False,
                 precision: str = "fp32", min_image: int | None = None, opt_image: int | None = None,
                 max_image: int | None = None, min_batch: int = 1, opt_batch: int = 1, max_batch: int = 4,
                 prediction_type: str | None = None, seed: int = 0, quantize: str | None = None,
                 force: bool = False, progress: Progress = print, backend: str | None = None,
                 loras: Sequence[Any] = (), embeddings: Sequence[Any] = (), step_cache: bool = STEP_CACHE_DEFAULT,
                 cache_branch: int = 0, tiling: bool = False, tiny_vae: str | os.PathLike | None = None,
                 default_steps: int | None = None, default_guidance: float | None = None,
                 default_sampler: str | None = None, controlnets: Sequence[Any] = (),
                 vae: str | os.PathLike | None = None) -> Path:
    """Build (or reuse) the engine folder `out_dir` for `source`; return its path.

    Every folder runs on every CPU backend (OpenVINO, ONNX Runtime, the PyTorch reference): the
    backend is chosen at run time. `tensorrt=True` also builds TensorRT plans (NVIDIA GPU).
    `backend=` is the deprecated spelling ("tensorrt" = tensorrt=True; the others change nothing).
    Image sizes default to half, once and twice the model's native size. `seed` seeds the random
    weights of presets. `quantize="int8"` adds the OpenVINO int8 U-Net (fp32 graphs only). `loras`
    ("FILE[:SCALE]" or (path, scale)) are merged and `embeddings` ("FILE[:TOKEN]" or (path, token))
    added before export (export/adapters.py); their files' sha256 join the reuse key. `step_cache`
    adds the DeepCache U-Nets unet_deep and unet_shallow for skip `cache_branch` (0: the shallowest;
    export/unet.py `cache_split`), sharing the unet's weights file (runtime/sampling/deepcache.py runs them).
    `tiling` adds unet_tiled, vae_decoder_tiled and vae_encoder_tiled: circular padding for seamless
    textures (A1111's `tiling`; export/circular.py), each sharing its base network's weights file.
    `tiny_vae` (a diffusers AutoencoderTiny folder or madebyollin's taesd_encoder / taesd_decoder
    .safetensors; export/loading/taesd.py) adds vae_decoder_tiny and vae_encoder_tiny beside the VAE,
    their entries recording its own scaling; its files' sha256 join the reuse key. `default_steps`,
    `default_guidance`, `default_sampler` set the manifest's recommended settings ("defaults"), over
    what the scheduler config implies (runtime/sampling/defaults.py: LCM, LCM-LoRA, trailing-spacing Euler).
    `controlnets` ("PATH[:NAME]" or (path, name); NAME defaults to the file's or folder's stem) adds one
    graph "controlnet.NAME" per ControlNet and `unet_control`, the U-Net taking their residuals, sharing
    the unet's weights file (export/controlnet.py; a ControlNet that does not fit the model is refused
    before any export). `vae` (a diffusers AutoencoderKL folder or a single VAE file, LDM or diffusers
    keys; export/loading/vae_source.py) replaces the source's VAE before export: its config.json's
    scaling_factor and force_upcast where it has one, else the source's; the manifest's source records
    it ("vae": path, sha256), and its sha256 joins the reuse key; one whose latents do not fit is
    refused before any export. Raises
    `BuildError`, `CheckpointError` (source), `ParityError` (a graph differs from PyTorch),
    `QuantizeError` or the TensorRT builder's error; `out_dir` is then left as it was."""
    tensorrt = _deprecated_backend(backend, tensorrt, progress)
    _check_request(precision, prediction_type, quantize, tensorrt)
    if isinstance(cache_branch, bool) or not isinstance(cache_branch, int) or cache_branch < 0:
        raise BuildError(f"cache_branch must be an integer >= 0; got {cache_branch!r}")
    if cache_branch and not step_cache:
        raise BuildError(f"--cache-branch {cache_branch} needs --step-cache (it picks the step-cache graphs' branch)")
    branch = cache_branch if step_cache else None
    out_dir = _output_folder(out_dir, progress)
    start = time.perf_counter()
    sizes = {"min_image": min_image, "opt_image": opt_image, "max_image": max_image, "min_batch": min_batch,
             "opt_batch": opt_batch, "max_batch": max_batch}
    plan = _plan(source, out_dir, seed, prediction_type, sizes, progress, parse_adapters(loras, embeddings), tiny_vae,
                 parse_controlnets(controlnets), vae)
    plan.defaults = _defaults(default_steps, default_guidance, default_sampler)
    if plan.defaults:
        plan.identity["defaults"] = plan.defaults  # joins the reuse key
    if plan.existing is not None or (out_dir / MANIFEST_NAME).is_file():
        problem = "--force given" if force else _reuse_problem(out_dir, plan.identity, precision, plan.shapes,
                                                               plan.tools, tensorrt, branch, bool(tiling))
        if problem is None:
            if _update_quantization(out_dir, quantize, progress):
                progress(f"updated {out_dir} in {time.perf_counter() - start:.1f} s")
            else:
                progress(f"up to date: {out_dir} matches the request (source, precision, shapes, quantization, "
                         "tools and every file's sha256); nothing to do")
            return out_dir
        progress(f"rebuilding {out_dir}: {problem}")
    _build_into(out_dir, plan, precision, quantize, tensorrt, prediction_type, progress, branch, bool(tiling))
    what = f"{precision}{', ' + quantize + ' U-Net' if quantize else ''}{', TensorRT plans' if tensorrt else ''}"
    progress(f"built {out_dir} ({what}) in {time.perf_counter() - start:.1f} s")
    return out_dir


def _defaults(steps: int | None, guidance: float | None, sampler: str | None) -> dict[str, Any]:
    """The --default-* settings given, checked (runtime/sampling/defaults.py `check_defaults`)."""
    from runtime.sampling.defaults import check_defaults
    from runtime.scheduler import SchedulerError

    try:
        return check_defaults({k: v for k, v in (("steps", steps), ("guidance_scale", guidance), ("sampler", sampler))
                               if v is not None})
    except SchedulerError as e:
        raise BuildError(f"--default-*: {e}") from None


def _deprecated_backend(backend: str | None, tensorrt: bool, progress: Progress) -> bool:
    """Map the old `--backend` spelling onto what it does: only "tensorrt" ever changed the folder."""
    if backend is None:
        return tensorrt
    from runtime.engines import BACKENDS

    if backend not in BACKENDS:
        raise BuildError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        progress("build-engine: --backend tensorrt is deprecated; use --tensorrt (same effect: also build "
                 "TensorRT plans)")
        return True
    progress(f"build-engine: --backend {backend} is deprecated and has no effect: every engine folder runs on "
             "every CPU backend; choose the backend at run time (runtime.load(dir, backend=...), "
             "sd-generate --backend). Use --tensorrt to also build TensorRT plans.")
    return tensorrt


def _check_request(precision: str, prediction_type: str | None, quantize: str | None, tensorrt: bool) -> None:
    """Refuse a bad request before any work (and TensorRT before minutes of export)."""
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
    if tensorrt:
        from runtime.engines.tensorrt import is_available

        ok, why = is_available()
        if not ok:
            raise BuildError(f"--tensorrt is not usable on this machine: {why}")


def _output_folder(out_dir: str | os.PathLike, progress: Progress) -> Path:
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir, progress)
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise BuildError(f"{out_dir} is not empty and is not an engine folder (no {MANIFEST_NAME}); "
                         "refusing to replace it")
    return out_dir


def parse_controlnets(specs: Sequence[Any]) -> tuple[tuple[Path, str], ...]:
    """`--controlnet PATH[:NAME]` values (or (path, name) pairs) -> ((path, name), ...); NAME
    defaults to the file's or folder's stem. Refuses bad or repeated names and missing paths."""
    from runtime.folder.networks import controlnet_network

    out: list[tuple[Path, str]] = []
    for spec in specs:
        if isinstance(spec, (tuple, list)):
            path, name = Path(spec[0]).expanduser(), spec[1] if len(spec) > 1 else None
        else:
            text = str(spec)
            head, sep, tail = text.rpartition(":")
            path, name = (Path(head).expanduser(), tail) if sep and not Path(text).exists() else (Path(text).expanduser(), None)
        name = name or path.name.split(".")[0]
        try:
            controlnet_network(name)
        except ValueError as e:
            raise BuildError(f"--controlnet {spec}: {e}") from None
        if not path.exists():
            raise BuildError(f"--controlnet {spec}: {path} does not exist (a diffusers ControlNetModel folder or a "
                             "single file)")
        if name in {n for _, n in out}:
            raise BuildError(f"--controlnet {spec}: the name {name!r} is given twice; name them PATH:NAME")
        out.append((path, name))
    return tuple(out)


def _controlnet_identity(controlnets: Sequence[tuple[Path, str]]) -> dict[str, Any]:
    """The source identity's "controlnets" (absent without any): name, kind, path and sha256 of each."""
    if not controlnets:
        return {}
    records = []
    for path, name in controlnets:
        kind = "diffusers" if path.is_dir() else "single_file"
        digest = tree_sha256(path) if path.is_dir() else file_sha256(path)
        records.append({"name": name, "kind": kind, "path": str(path.resolve()), "sha256": digest})
    return {"controlnets": records}


def load_controlnets(model: Any, records: Sequence[dict[str, Any]], progress: Progress) -> Any:
    """`model` with its ControlNets loaded (export/controlnet.py), each checked against its U-Net."""
    from export.controlnet import check_compatible, load_controlnet

    for record in records:
        with _stage(progress, f"loading ControlNet {record['name']} from {record['path']}"):
            controlnet = load_controlnet(record["path"], model.spec.unet)
            check_compatible(controlnet.config, model.spec.unet, model.spec.family, record["name"],
                             model.spec.vae_scale_factor)
        model.controlnets[record["name"]] = controlnet
    return model


def _plan(source: str | os.PathLike, out_dir: Path, seed: int, prediction_type: str | None,
          sizes: dict[str, int | None], progress: Progress, adapters: Adapters = Adapters(),
          tiny_vae: str | os.PathLike | None = None,
          controlnets: Sequence[tuple[Path, str]] = (), vae: str | os.PathLike | None = None) -> _Plan:
    """Hash the source, read the folder's manifest, and settle the shape range (loading the model
    only where its configs are needed for the default sizes)."""
    from export.configs import preset
    from export.loading.taesd import load_tiny_vae

    with _stage(progress, f"hashing source {source}"):
        identity = {**source_identity(source, seed), "prediction_type": prediction_type, **adapters.identity(),
                    **_controlnet_identity(controlnets)}
    tiny = None
    if tiny_vae is not None:
        with _stage(progress, f"reading the tiny VAE {tiny_vae}"):
            tiny = load_tiny_vae(tiny_vae)
        identity["tiny_vae"] = {k: v for k, v in tiny.identity.items() if k != "path"}  # paths may move
    replacement = None
    if vae is not None:
        from export.loading.vae_source import read_vae

        with _stage(progress, f"reading the VAE {vae}"):
            replacement = read_vae(vae)
        identity["vae"] = dict(replacement.identity)  # compared without its path (adapters.comparable)
    try:
        existing = load_manifest(out_dir) if (out_dir / MANIFEST_NAME).is_file() else None
    except ManifestError:
        existing = None
    model = spec = None
    if identity["kind"] == "preset" and identity["preset"] != "tiny":
        spec = preset(identity["preset"])
        default = spec.unet.sample_size * spec.vae_scale_factor
    elif existing is not None and _same_source(existing.source, identity):
        default = existing.default_size[0]
    else:  # sizes depend on the checkpoint's configs: load it first
        with _stage(progress, "loading model"):
            model = load_source(identity, prediction_type)
        spec = model.spec
        default = spec.unet.sample_size * spec.vae_scale_factor
    opt = sizes["opt_image"] or default
    shapes = {"min_batch": sizes["min_batch"], "opt_batch": sizes["opt_batch"], "max_batch": sizes["max_batch"],
              "min_image": sizes["min_image"] or min(opt, default // 2), "opt_image": opt,
              "max_image": sizes["max_image"] or max(opt, default * 2)}
    if spec is not None:
        _check_shapes(spec, shapes)
    return _Plan(identity, existing, model, shapes, tool_versions(), adapters, tiny, vae=replacement)


def _build_into(out_dir: Path, plan: _Plan, precision: str, quantize: str | None, tensorrt: bool,
                prediction_type: str | None, progress: Progress, cache_branch: int | None = None,
                tiling: bool = False) -> None:
    """Export everything into a temporary sibling folder, then swap it in atomically."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        model = plan.model
        if model is None:
            with _stage(progress, "loading model"):
                model = load_source(plan.identity, prediction_type)
        plan.model = None
        if plan.vae is not None:  # --vae: in place of the source's, before anything reads the VAE config
            from export.loading.vae_source import with_vae

            model, plan.vae = with_vae(model, plan.vae), None
        model = load_controlnets(plan.adapters.apply(model, progress), plan.identity.get("controlnets", ()), progress)
        _check_shapes(model.spec, plan.shapes)
        manifest = plan.adapters.annotate(_export_all(model, plan.identity, tmp, precision, plan.shapes, plan.tools,
                                                      progress, cache_branch, tiling, plan.tiny_vae))
        manifest = replace(manifest, defaults={**recommended(model.spec.scheduler, bool(model.spec.unet.time_cond_proj_dim)),
                                               **(plan.defaults or {})})
        del model
        gc.collect()
        if quantize is not None:
            manifest = _quantize(tmp, manifest, quantize, progress)
        if tensorrt:
            _carry_plans(out_dir, tmp)
            manifest = _build_tensorrt(tmp, manifest, precision, progress)
        write_manifest(tmp, manifest, record_files=True)
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


def network_precision(spec: Any, network: str, precision: str) -> str:
    """The precision of one network's graph in a folder of `precision`: fp16 graphs for fp16 folders,
    except the VAE where its config sets `force_upcast` (diffusers' AutoencoderKL config: SD 1.x's VAE
    overflows to NaN, black images, in fp16), which stays fp32; fp32 graphs otherwise (bf16 runs an
    fp32 graph)."""
    if precision != "fp16":
        return "fp32"
    if network.startswith("vae_") and spec.vae.force_upcast:
        return "fp32"
    return "fp16"


# long: one export per network (and per optional group), then the manifest
def _export_all(model: Any, identity: dict[str, Any], folder: Path, precision: str, shapes: dict[str, int],
                tools: dict[str, str], progress: Progress, cache_branch: int | None = None,
                tiling: bool = False, tiny_vae: Any = None) -> Manifest:
    from export.onnx_export import default_parity_shapes, export_network, step_cache_dims

    spec = model.spec
    dims = spec.dims if cache_branch is None else step_cache_dims(spec, cache_branch)  # refuse a bad branch first
    parity_shapes = default_parity_shapes(spec, shapes["min_image"], shapes["opt_image"], shapes["max_image"],
                                          shapes["max_batch"])
    networks = {}

    def export(network: str) -> None:
        graph_precision = network_precision(spec, network, precision)
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

    # One big network in memory at a time: each PyTorch module is released once the graphs made from it
    # are exported and checked (the full-size SDXL U-Net alone is 10.3 GB in fp32, its second text
    # encoder 2.8 GB). The first text encoder stays (the SDXL refiner has none).
    if model.text_encoder is not None:
        export("text_encoder")
    if model.text_encoder_2 is not None:
        export("text_encoder_2")
        _release(model, "text_encoder_2")
    export("unet")
    if cache_branch is not None:
        networks.update(_export_step_cache(model, folder, networks["unet"], precision, parity_shapes, cache_branch,
                                           progress))
    if tiling:  # the circular variants of the U-Net and both VAE graphs, after those (and the step cache)
        export("vae_decoder")
        export("vae_encoder")
        networks.update(_export_tiling(model, folder, networks, precision, parity_shapes, progress))
    if model.controlnets:  # last of the graphs sharing unet.onnx.data (export/onnx_export.py `export_control`)
        dims = replace(dims, block_out_channels=tuple(spec.unet.block_out_channels),
                       layers_per_block=spec.unet.layers_per_block)
        networks.update(_export_control(model, folder, networks, identity, precision, parity_shapes, progress))
        _release(model, "controlnets")
    _release(model, "unet")
    if not tiling:
        export("vae_decoder")
        export("vae_encoder")
    for name in (n for n in networks if n.startswith("vae_") and getattr(spec.vae, "kind", None)):
        networks[name]["vae"] = spec.vae.kind  # "tiny": an AutoencoderTiny (export/tiny_vae.py); absent: KL
    if tiny_vae is not None:
        networks.update(_export_tiny_vae(model, tiny_vae, folder, precision, parity_shapes, progress))
    tokenizer, pipeline = _tokenizers(model, folder), {}
    if spec.text_encoder_2 is not None:  # SDXL: how an empty negative prompt encodes
        pipeline["force_zeros_for_empty_prompt"] = spec.force_zeros_for_empty_prompt
    size = spec.unet.sample_size * spec.vae_scale_factor
    return Manifest(
        family=spec.family, dims=dims, scaling_factor=spec.vae.scaling_factor,
        prediction_type=spec.prediction_type, scheduler=dict(spec.scheduler), tokenizer=tokenizer,
        default_size=(size, size), shapes=dict(shapes), precision=precision, networks=networks, backends={},
        source=identity, tools=tools, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        pipeline=pipeline,
    )


def _tokenizers(model: Any, folder: Path) -> dict[str, Any]:
    """The manifest's tokenizer entry, its files copied: the first tokenizer, with SDXL's second as
    `tokenizer_2`; the SDXL refiner's only one (its tokenizer_2) as the entry itself."""
    spec = model.spec
    if spec.text_encoder is None:
        return _copy_tokenizer(model.tokenizer_2_dir, folder, "tokenizer_2", spec.pad_token_2)
    tokenizer = _copy_tokenizer(model.tokenizer_dir, folder, "tokenizer", spec.pad_token)
    if spec.text_encoder_2 is not None:
        tokenizer["tokenizer_2"] = _copy_tokenizer(model.tokenizer_2_dir, folder, "tokenizer_2", spec.pad_token_2)
    return tokenizer


def _release(model: Any, name: str) -> None:
    """Drop the build's own `LoadedModel`'s network `name` (the caller holds no other reference: the
    plan gave the model up) and return its memory before the next export."""
    setattr(model, name, {} if name == "controlnets" else None)
    gc.collect()


def _export_tiny_vae(model: Any, tiny: Any, folder: Path, precision: str, parity_shapes: Any,
                     progress: Progress) -> dict[str, dict[str, Any]]:
    """vae_decoder_tiny and vae_encoder_tiny (runtime/folder/networks.py TINY_VAE_NETWORKS) from the
    `--tiny-vae` source, each checked against export/tiny_vae.py; their manifest entries, which record
    the tiny VAE's own scaling (export/loading/taesd.py `manifest_entry`)."""
    from export.loading.taesd import manifest_entry, with_tiny_vae
    from export.onnx_export import export_network
    from runtime.folder.networks import TINY_VAE_NETWORKS

    tiny_model = with_tiny_vae(model, tiny)
    entries = {}
    for network in TINY_VAE_NETWORKS:
        graph_precision = network_precision(tiny_model.spec, network, precision)
        with _stage(progress, f"exporting {network} ({graph_precision}, the tiny VAE)"):
            result = export_network(network, tiny_model, folder, precision=graph_precision, parity_shapes=parity_shapes)
        progress(f"  {network}: parity vs PyTorch fp32: relative {result.parity['rel']:.3g} "
                 f"(threshold {result.parity['threshold']:g})")
        entries[network] = {"file": result.file, "external_data": result.external_data, "precision": graph_precision,
                            "sha256": file_sha256(folder / result.file), "parity": result.parity,
                            "export_seconds": round(result.seconds, 2), **manifest_entry(tiny)}
        if result.external_data:
            entries[network]["external_data_sha256"] = file_sha256(folder / result.external_data)
    return entries


def _copy_tokenizer(source: Path, folder: Path, name: str, pad_token: str) -> dict[str, Any]:
    """Copy a tokenizer's files into `folder/name`; its manifest entry (dir, pad_token, files' sha256)."""
    tok_dir = folder / name
    tok_dir.mkdir()
    files = {}
    for f in sorted(Path(source).iterdir()):
        if f.is_file():
            shutil.copy2(f, tok_dir / f.name)
            files[f.name] = file_sha256(f)
    return {"dir": name, "pad_token": pad_token, "files": files}


def _export_step_cache(model: Any, folder: Path, unet_entry: dict[str, Any], precision: str, parity_shapes: Any,
                       branch: int, progress: Progress) -> dict[str, dict[str, Any]]:
    """unet_deep and unet_shallow for cache `branch`, all three U-Net graphs pointed at one weights
    file (export/onnx_export.py `export_step_cache`); returns their manifest entries, the unet's
    updated, each with its graph and weights sizes in bytes."""
    from export.onnx_export import export_step_cache

    graph_precision = network_precision(model.spec, "unet", precision)
    with _stage(progress, f"exporting unet_deep, unet_shallow (step cache, branch {branch}, {graph_precision})"):
        result = export_step_cache(model, folder, branch=branch, precision=graph_precision,
                                   parity_shapes=parity_shapes)
    check = result.consistency
    progress(f"  unet_deep vs unet: relative {check['deep_vs_unet']:.3g}; unet_shallow on unet_deep's feature vs "
             f"unet_deep: relative {check['shallow_vs_deep']:.3g} (threshold {check['threshold']:g})")
    shared = {"external_data": result.data_file, "external_data_sha256": file_sha256(folder / result.data_file)}
    entries = {"unet": {**unet_entry, "sha256": file_sha256(folder / "unet.onnx"), **shared, **result.sizes["unet"]}}
    for name, r in result.results.items():
        progress(f"  {name}: parity vs the PyTorch reference split: relative {r.parity['rel']:.3g}")
        entries[name] = {"file": r.file, "precision": graph_precision, "sha256": file_sha256(folder / r.file),
                         "parity": {**r.parity, "step_cache": check}, "export_seconds": round(r.seconds, 2),
                         "branch": branch, **shared, **result.sizes[name]}
    return entries


def _export_tiling(model: Any, folder: Path, networks: dict[str, dict[str, Any]], precision: str, parity_shapes: Any,
                   progress: Progress) -> dict[str, dict[str, Any]]:
    """unet_tiled, vae_decoder_tiled and vae_encoder_tiled (export/circular.py `export_tiling`),
    each sharing its base network's weights file; returns their manifest entries and those of the
    networks whose files were rewritten (updated), each with its graph and weights sizes in bytes."""
    from export.circular import export_tiling

    with _stage(progress, "exporting unet_tiled, vae_decoder_tiled, vae_encoder_tiled (circular padding)"):
        result = export_tiling(model, folder, precision_of=lambda n: network_precision(model.spec, n, precision),
                               parity_shapes=parity_shapes)
    entries = {}
    for name, sizes in result.sizes.items():
        data = result.data_files[name]
        r = result.results.get(name)
        entry = networks[name] if r is None else {
            "file": r.file, "precision": r.precision, "parity": r.parity, "export_seconds": round(r.seconds, 2),
            "tiling": True}
        entries[name] = {**entry, "sha256": file_sha256(folder / entry["file"]), "external_data": data,
                         "external_data_sha256": file_sha256(folder / data), **sizes}
        if r is not None:
            progress(f"  {name}: parity vs PyTorch fp32 with circular padding: relative {r.parity['rel']:.3g} "
                     f"(threshold {r.parity['threshold']:g}); on the final file {r.parity['final_file']['rel']:.3g}")
    return entries


def _export_control(model: Any, folder: Path, networks: dict[str, dict[str, Any]], identity: dict[str, Any],
                    precision: str, parity_shapes: Any, progress: Progress) -> dict[str, dict[str, Any]]:
    """unet_control and one "controlnet.NAME" graph per ControlNet (export/onnx_export.py
    `export_control`); returns their manifest entries and those of the U-Net graphs now sharing
    unet_control's weights file (updated). Each ControlNet's entry records its name, source and
    conditioning channels under "controlnet"."""
    from export.onnx_export import export_control

    graph_precision = network_precision(model.spec, "unet", precision)
    with _stage(progress, f"exporting unet_control and {len(model.controlnets)} ControlNet(s) ({graph_precision})"):
        result = export_control(model, folder, precision=graph_precision, parity_shapes=parity_shapes)
    sources = {r["name"]: r for r in identity.get("controlnets", ())}
    data = result.results["unet_control"].external_data
    shared = {"external_data": data, "external_data_sha256": file_sha256(folder / data)}
    entries = {name: {**networks.get(name, {}), **sizes, **shared} for name, sizes in result.sizes.items()}
    for name, r in result.results.items():
        entry = {"file": r.file, "precision": graph_precision, "parity": r.parity,
                 "export_seconds": round(r.seconds, 2), "external_data": r.external_data}
        if r.external_data:
            entry["external_data_sha256"] = file_sha256(folder / r.external_data)
        if name == "unet_control":
            entry["parity"] = {**r.parity, "final_file": result.final_file}
        else:
            cn = name.partition(".")[2]
            entry["controlnet"] = {"name": cn, "source": sources.get(cn, {}),
                                   "conditioning_channels": model.controlnets[cn].config.conditioning_channels}
        entries[name] = {**entries.get(name, {}), **entry}
        progress(f"  {name}: parity vs PyTorch fp32: relative {r.parity['rel']:.3g} (threshold {r.parity['threshold']:g})")
    return {name: {**entry, "sha256": file_sha256(folder / entry["file"])} for name, entry in entries.items()}


def _quantize(folder: Path, manifest: Manifest, scheme: str, progress: Progress) -> Manifest:
    from export.compress import SCHEME as WEIGHTS_ONLY, compress_weights
    from export.quantize import quantize_unet

    write_manifest(folder, manifest, record_files=True)  # calibration runs the folder through the runtime
    if scheme == WEIGHTS_ONLY:
        with _stage(progress, "compressing the U-Net's and text encoder's weights to int8 (OpenVINO)"):
            entry = compress_weights(folder, manifest, progress=progress)
    else:
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
    if manifest.quantization == scheme:
        return False
    if manifest.quantization is not None:
        progress(f"removing the {manifest.quantization} networks from {out_dir} (not requested"
                 f"{'' if scheme else '; pass --quantize ' + manifest.quantization + ' to keep them'})")
        old = _quantized_entries(manifest)
        backends = dict(manifest.backends)
        rest = {k: v for k, v in backends.pop("openvino").items() if k not in ("unet_int8", "weights_int8")}
        if rest:
            backends["openvino"] = rest
        manifest = replace(manifest, backends=backends)
        write_manifest(out_dir, manifest, record_files=True)
        for entry in old:
            for rel in (entry["file"], entry["weights"]):
                (out_dir / rel).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (out_dir / Path(old[0]["file"]).parent).rmdir()  # only if empty
    if scheme is not None:
        progress(f"adding the {scheme} networks to {out_dir} (the graphs are up to date; no export needed)")
        write_manifest(out_dir, _quantize(out_dir, manifest, scheme, progress), record_files=True)
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
    write_manifest(folder, manifest, record_files=True)  # the TensorRT builder may read the folder's manifest
    with _stage(progress, f"building TensorRT plans ({precision})"):
        entry = build_tensorrt_engines(folder, manifest, precision=precision, progress=progress)
    return replace(manifest, backends={**manifest.backends, "tensorrt": entry})

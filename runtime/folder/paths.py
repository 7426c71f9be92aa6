"""Engine folders from strangers: every path the runtime opens stays inside the folder, and every
file is the one the manifest vouches for.

**Containment.** `inside(engine_dir, rel, what)` is the one way the runtime turns a path written in a
folder (manifest entries, ONNX external-data locations, TensorRT plan and key names) into a path to
open. It refuses, with a ManifestError naming the entry, before anything is opened: a path that is
not a string, absolute paths (POSIX or Windows), `..` components, backslashes, NUL bytes, and paths
whose real path (symlinks followed with `os.path.realpath`, which only reads links) leaves the
folder; then `os.stat` (which opens nothing) must find a regular file, so a FIFO or a device inside
the folder is refused too.

**Integrity.** `write_manifest` records in the manifest's `files` table, for every file the runtime
opens (`opened_files`), its size, its sha256 and a fingerprint: the sha256 of its first MiB and its
last MiB (`fingerprint`; for a file of 2 MiB or less, the sha256 of the whole file). `check_folder`,
which `open_engines` runs before any backend opens a file, compares:
  - default: every file's size and fingerprint (reads 2 MiB per file): catches a truncated,
    extended or replaced file, and any change within its first or last MiB;
  - verify=True: every file's full sha256 as well (reads everything): catches any changed byte.
Folders built before the table ("legacy": the manifest has per-file sha256 only) get containment and
the external-data bounds check by default (with a logged warning), and the full sha256 with
verify=True; `build-engine --verify DIR` verifies such a folder and then records its table.

**ONNX graphs** name their external data inside the protobuf; every `location` is read
(runtime/folder/onnx_refs.py) and must resolve inside the folder to a regular file that holds the bytes
[offset, offset + length) the reference names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from runtime.errors import IntegrityError, ManifestError
from runtime.folder.onnx_refs import external_refs

__all__ = ["FINGERPRINT_SPAN", "FolderCheck", "check_folder", "file_records", "file_sha256", "fingerprint",
           "check_graph", "inside", "opened_files", "relative_parts"]

log = logging.getLogger(__name__)

# Bytes hashed at each end of a file by `fingerprint`: 2 MiB read per file, a few milliseconds.
FINGERPRINT_SPAN = 1 << 20
# Folders the engines write into (OpenVINO's compile cache, TensorRT plans and ORT's TensorRT EP
# cache): where they exist they must not lead outside either.
WRITABLE_SUBDIRS = ("openvino-cache", "tensorrt", "tensorrt/ort-cache")
# tokenizer_config.json keys that could name a file for transformers to read (vocab_file, ...)
_FILE_KEY = re.compile(r".*_file$")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FolderCheck:
    """What `check_folder` did: mode "fingerprint" (size + first/last MiB), "sha256" (verify=True) or
    "legacy" (a folder without a `files` table: containment and bounds only), files checked, bytes
    read to hash them, and seconds taken."""

    mode: str
    files: int
    bytes_read: int
    seconds: float


# --- containment -------------------------------------------------------------------------------------

def relative_parts(rel: Any, what: str, where: str) -> tuple[str, ...]:
    """The components of a folder-relative path, refusing (ManifestError naming `what`) anything that
    could lead elsewhere whatever the folder holds: absolute paths, '..', backslashes, NUL bytes."""
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"{where}: {what} {_short(rel)}: not a non-empty relative path string")
    if "\0" in rel or "\\" in rel:
        raise ManifestError(f"{where}: {what} {_short(rel)}: it contains a NUL byte or a backslash; refusing it")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or PureWindowsPath(rel).is_absolute():
        raise ManifestError(f"{where}: {what} {_short(rel)}: an absolute path; refusing it (a folder may only "
                            "name files inside itself)")
    parts = tuple(p for p in rel.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ManifestError(f"{where}: {what} {_short(rel)}: it has a '..' component; refusing it (a folder may "
                            "only name files inside itself)")
    if not parts:
        raise ManifestError(f"{where}: {what} {_short(rel)}: that is the folder itself, not a file in it")
    return parts


def inside(engine_dir: str | os.PathLike, rel: Any, what: str, *, kind: str = "file",
           base: str | os.PathLike | None = None) -> Path:
    """`engine_dir / rel` after checking that it stays inside `engine_dir` (symlinks followed) and is
    a regular file (`kind="file"`) or a folder (`kind="dir"`). `base` (a folder inside engine_dir)
    is what `rel` is relative to, as for ONNX external data (relative to the graph's folder).
    Opens nothing; raises ManifestError naming `what` and the path."""
    root = Path(os.path.realpath(engine_dir))
    start = Path(engine_dir) if base is None else Path(base)
    path = start.joinpath(*relative_parts(rel, what, str(engine_dir)))
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise ManifestError(f"{engine_dir}: {what} {rel!r}: it leads outside the folder (to {real}); refusing to "
                            "open it. An engine folder may only use files inside itself (copy symlinked files in)")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise ManifestError(f"{engine_dir}: {what} {rel!r}, which is missing") from None
    except OSError as e:
        raise ManifestError(f"{engine_dir}: {what} {rel!r}, which cannot be examined: {e}") from e
    want, test = ("a regular file", stat.S_ISREG) if kind == "file" else ("a folder", stat.S_ISDIR)
    if not test(mode):
        raise ManifestError(f"{engine_dir}: {what} {rel!r}, which is not {want} (a FIFO, a device or another kind "
                            "of entry); refusing to open it")
    return path


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _writable_subdirs(engine_dir: Path) -> None:
    for rel in WRITABLE_SUBDIRS:
        if os.path.lexists(engine_dir / rel):
            inside(engine_dir, rel, "the engine cache folder", kind="dir")


def tokenizer_entries(tokenizer: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's tokenizer entry, and SDXL's second tokenizer's (`tokenizer.tokenizer_2`) where
    there is one: each {"dir", "pad_token", "files"}."""
    second = tokenizer.get("tokenizer_2")
    if second is not None and not isinstance(second, dict):
        raise ManifestError(f"manifest: tokenizer.tokenizer_2 must be an object; got {_short(second)}")
    return [tokenizer] + ([second] if second is not None else [])


def _tokenizer_entries(engine_dir: Path, tokenizer: dict[str, Any]) -> Path:
    """The tokenizer folder, after checking that each of its entries (transformers reads whichever
    files it finds there) is a regular file inside the engine folder (or a plain subfolder)."""
    rel = tokenizer.get("dir", "tokenizer")
    tok_dir = inside(engine_dir, rel, "the tokenizer names folder", kind="dir")
    for entry in sorted(os.listdir(tok_dir)):
        if os.path.isdir(tok_dir / entry) and not os.path.islink(tok_dir / entry):
            continue
        inside(engine_dir, f"{rel}/{entry}", "the tokenizer folder holds")
    return tok_dir


def _no_file_keys(path: Path) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ManifestError(f"{path}: unreadable tokenizer JSON: {e}") from e
    named = sorted(k for k, v in data.items() if _FILE_KEY.match(str(k)) and v) if isinstance(data, dict) else []
    if named:
        raise ManifestError(f"{path} names files to read ({', '.join(named)}); the runtime reads only the "
                            "tokenizer folder's own vocab.json and merges.txt. Remove those keys")


# --- what the runtime opens ------------------------------------------------------------------------------

def _str_at(entry: Any, key: str, where: str) -> str | None:
    if not isinstance(entry, dict):
        raise ManifestError(f"manifest: {where} must be an object; got {type(entry).__name__}")
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise ManifestError(f"manifest: {where}.{key} must be a path string; got {value!r}")
    return value


def opened_files(manifest: Any, backends: Collection[str] | None = None, *, common: bool = True) -> dict[str, str]:
    """Folder-relative path -> what names it, for every file the tokenizer or a backend may open:
    with `common`, the ONNX graphs, their external data and the tokenizer files; and the files only one
    backend reads (OpenVINO's int8 U-Net, TensorRT's plans and keys) of `backends` (None: all)."""
    int8, trt = _int8_files(manifest.backends.get("openvino")), _trt_files(manifest.backends.get("tensorrt"))
    files: dict[str, str] = {}
    files.update(int8 if backends is None or "openvino" in backends else {})
    files.update(trt if backends is None or "tensorrt" in backends else {})
    if not common:
        return files
    for name, entry in manifest.networks.items():
        for key in ("file", "external_data"):
            rel = _str_at(entry, key, f"networks.{name}")
            if rel:
                files.setdefault(rel, f"network {name!r} names {key}")
    for tok in tokenizer_entries(manifest.tokenizer):
        tok_dir = _str_at(tok, "dir", "tokenizer") or "tokenizer"
        for name in tok.get("files") or {}:
            files.setdefault(f"{tok_dir}/{name}", "the tokenizer names file")
    return files


def _trt_files(trt: Any) -> dict[str, str]:
    if trt is None:
        return {}
    networks = trt.get("networks", {}) if isinstance(trt, dict) else None
    if not isinstance(networks, dict):
        raise ManifestError(f"manifest: backends.tensorrt must be an object with a 'networks' object; got {_short(trt)}")
    files = {}
    for name, entry in networks.items():
        for key in ("plan", "key"):
            rel = _str_at(entry, key, f"backends.tensorrt.networks.{name}")
            if rel:
                files[rel] = f"the TensorRT {name} entry names {key}"
    return files


def _openvino_entries(openvino: Any) -> list[tuple[str, Any]]:
    """(label, entry) of every quantized IR of backends.openvino: the int8 U-Net (`--quantize int8`) and
    the int8-weight networks (`--quantize int8-weights`)."""
    if openvino is not None and not isinstance(openvino, dict):
        raise ManifestError(f"manifest: backends.openvino must be an object; got {_short(openvino)}")
    openvino = openvino or {}
    entries = [("the int8 U-Net", openvino["unet_int8"])] if openvino.get("unet_int8") is not None else []
    weights = openvino.get("weights_int8")
    networks = weights.get("networks", {}) if isinstance(weights, dict) else {} if weights is None else None
    if not isinstance(networks, dict):
        raise ManifestError(f"manifest: backends.openvino.weights_int8 must be an object with a 'networks' object; "
                            f"got {_short(weights)}")
    return entries + [(f"the int8-weight {name}", entry) for name, entry in networks.items()]


def _int8_files(openvino: Any) -> dict[str, str]:
    files = {}
    for label, entry in _openvino_entries(openvino):
        xml, weights = _str_at(entry, "file", label), _str_at(entry, "weights", label)
        if not xml or not weights or PurePosixPath(weights) != PurePosixPath(xml).with_suffix(".bin"):
            raise ManifestError(f"manifest: {label}'s file {xml!r} and weights {weights!r} must be an IR .xml and "
                                "the .bin beside it (the one OpenVINO reads)")
        files[xml], files[weights] = f"{label} names graph", f"{label} names weights"
    return files


def _legacy_sha256(manifest: Any) -> dict[str, str]:
    """rel -> sha256 as folders built before the `files` table record them (per entry)."""
    known = {}
    for entry in manifest.networks.values():
        known[entry.get("file")] = entry.get("sha256")
        known[entry.get("external_data")] = entry.get("external_data_sha256")
    tok_dir = manifest.tokenizer.get("dir", "tokenizer")
    for name, digest in (manifest.tokenizer.get("files") or {}).items():
        known[f"{tok_dir}/{name}"] = digest
    for _, entry in _openvino_entries(manifest.backends.get("openvino")):
        known[entry.get("file")] = entry.get("sha256")
        known[entry.get("weights")] = entry.get("weights_sha256")
    return {rel: d for rel, d in known.items() if isinstance(rel, str) and isinstance(d, str)}


# --- hashing -------------------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's contents (export/hashing.py's `file_sha256`, without the export package)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(path: str | os.PathLike, size: int | None = None) -> str:
    """sha256 of the file's first FINGERPRINT_SPAN bytes followed by its last FINGERPRINT_SPAN bytes
    (the part not already read: a file of up to 2 spans is hashed whole, so its fingerprint is its sha256)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size if size is None else size
        h.update(f.read(FINGERPRINT_SPAN))
        if size > FINGERPRINT_SPAN:
            f.seek(max(FINGERPRINT_SPAN, size - FINGERPRINT_SPAN))
            h.update(f.read(FINGERPRINT_SPAN))
    return h.hexdigest()


def file_records(engine_dir: str | os.PathLike, manifest: Any) -> dict[str, dict[str, Any]]:
    """The manifest's `files` table for the folder as it is now: rel -> {size, sha256, fingerprint} of
    every opened file. sha256s the manifest's entries already record are reused (the build computed
    them); the others (TensorRT plans and keys) are computed."""
    engine_dir = Path(engine_dir)
    known = _legacy_sha256(manifest)
    table = {}
    for rel, what in sorted(opened_files(manifest).items()):
        path = inside(engine_dir, rel, what)
        size = path.stat().st_size
        table[rel] = {"size": size, "sha256": known.get(rel) or file_sha256(path), "fingerprint": fingerprint(path, size)}
    return table


# --- the check -----------------------------------------------------------------------------------------------

def _records(manifest: Any, opened: dict[str, str], where: str) -> dict[str, dict[str, Any]] | None:
    """The manifest's `files` table, validated and covering every opened file; None for a legacy folder."""
    table = manifest.files
    if not table:
        return None
    for rel in opened:
        rec = table.get(rel)
        if not isinstance(rec, dict):
            raise IntegrityError(f"{where}: the manifest's files table has no record of {rel} ({opened[rel]})")
        size, digest, fp = rec.get("size"), rec.get("sha256"), rec.get("fingerprint")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not all(
                isinstance(v, str) and _HEX64.fullmatch(v) for v in (digest, fp)):
            raise ManifestError(f"{where}: the files table's record of {rel} is malformed: {_short(rec)}")
    return table


def _check_file(engine_dir: Path, path: Path, rel: str, rec: dict[str, Any], verify: bool) -> int:
    """Compare one file with its record; return the bytes read."""
    size = path.stat().st_size
    if size != rec["size"]:
        raise IntegrityError(f"{engine_dir}: {rel} has {size} bytes, the manifest records {rec['size']}: it was "
                             "truncated, extended or replaced after the build. Rebuild or re-download the folder")
    if fingerprint(path, size) != rec["fingerprint"]:
        raise IntegrityError(f"{engine_dir}: {rel} differs from the file the manifest records (its first or last "
                             "MiB changed): it was modified or replaced after the build")
    if not verify:
        return min(size, 2 * FINGERPRINT_SPAN)
    if file_sha256(path) != rec["sha256"]:
        raise IntegrityError(f"{engine_dir}: {rel} does not match its sha256 in the manifest (verify=True): "
                             "some byte changed after the build")
    return size + min(size, 2 * FINGERPRINT_SPAN)


def _check_legacy(engine_dir: Path, paths: dict[str, Path], manifest: Any, verify: bool, warn: bool) -> int:
    if not verify:
        if not warn:
            return 0
        log.warning("%s: the manifest predates file fingerprints (no 'files' table): only paths and external-data "
                    "bounds were checked. Run `build-engine --verify %s` once to verify and record them.",
                    engine_dir, engine_dir)
        return 0
    known, read = _legacy_sha256(manifest), 0
    for rel, path in paths.items():
        if rel in known and file_sha256(path) != known[rel]:
            raise IntegrityError(f"{engine_dir}: {rel} does not match its sha256 in the manifest (verify=True): "
                                 "it changed after the build")
        read += path.stat().st_size if rel in known else 0
    return read


def check_graph(engine_dir: Path, graph: Path, rel: str) -> None:
    """Every external-data reference of an ONNX graph stays inside the folder and within its file.
    A backend resolves a location against the graph's folder as named or as its real path (a graph may
    be a symlink within the folder): both must stay inside."""
    bases = {graph.parent, Path(os.path.realpath(graph)).parent}
    for ref in external_refs(graph):
        what = f"tensor {ref.tensor!r} of {rel} names external data"
        for base in sorted(bases):
            target = inside(engine_dir, ref.location, what, base=base)
        end = (ref.offset or 0) + (ref.length or 0)
        size = target.stat().st_size
        if end > size:
            raise IntegrityError(f"{engine_dir}: tensor {ref.tensor!r} of {rel} reads bytes up to {end} of "
                                 f"{ref.location}, which has {size}: the file is truncated or not this graph's")


def check_folder(engine_dir: str | os.PathLike, manifest: Any, *, verify: bool = False,
                 backends: Collection[str] | None = None, common: bool = True) -> FolderCheck:
    """Check an engine folder before a backend opens anything in it: first the containment of every
    path (the manifest's, the tokenizer folder's entries, the cache folders'), then each file against
    the manifest's record (size and fingerprint; with `verify`, sha256 too), then the contents that
    name further files (every ONNX graph's external data, the tokenizer's JSON). `backends` and
    `common` choose the files as `opened_files` does. Raises ManifestError (a path is unsafe, missing
    or not a regular file) or IntegrityError (a file differs from its record) naming the file."""
    start = time.perf_counter()
    engine_dir = Path(engine_dir)
    opened = opened_files(manifest, backends, common=common)
    paths = {rel: inside(engine_dir, rel, what) for rel, what in sorted(opened.items())}
    tok_dirs = [_tokenizer_entries(engine_dir, t) for t in tokenizer_entries(manifest.tokenizer)] if common else []
    _writable_subdirs(engine_dir)
    table = _records(manifest, opened, str(engine_dir))
    if table is None:
        mode, read = "legacy", _check_legacy(engine_dir, paths, manifest, verify, warn=common)
    else:
        mode = "sha256" if verify else "fingerprint"
        read = sum(_check_file(engine_dir, paths[rel], rel, table[rel], verify) for rel in paths)
    for entry in manifest.networks.values() if common else ():
        check_graph(engine_dir, paths[entry["file"]], entry["file"])
    for tok_dir in tok_dirs:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (tok_dir / name).is_file():
                _no_file_keys(tok_dir / name)
    return FolderCheck(mode, len(paths), read, time.perf_counter() - start)

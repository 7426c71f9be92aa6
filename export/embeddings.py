"""Textual-inversion embeddings (Gal et al. 2022, arXiv:2208.01618) added to the model before export:
each vector becomes a new row of the text encoder's token-embedding table, and its token a new token
of the folder's tokenizer.

File formats read:
- A1111 `.pt` (stable-diffusion-webui `modules/textual_inversion`): a dict whose `string_to_param`
  holds the vectors under "*", [n, hidden]; read with `torch.load(weights_only=True)`, so a pickle
  that holds anything but tensors and plain data is refused.
- A1111 `.safetensors`: one tensor `emb_params`, [n, hidden].
- diffusers (`learned_embeds.safetensors` / `.bin` of its textual_inversion training script): one
  entry {token: [hidden] or [n, hidden]}. The token stored there is not used: the name is the file's
  stem (as A1111 names embeddings) unless given, `--embedding FILE:TOKEN`.
- SDXL (`.safetensors`, as A1111 and diffusers' SDXL docs read them): `clip_l` [n, 768] for the first
  text encoder and `clip_g` [n, 1280] for the second; their tokens go into both tokenizers. SDXL models
  take only these, other models never. The SDXL refiner, whose one text encoder is the second, takes
  the `clip_g` vectors into it and the tokens into its one tokenizer (diffusers:
  `load_textual_inversion(clip_g, text_encoder=text_encoder_2, tokenizer=tokenizer_2)`).
Vectors of another width than the text encoder's (an embedding for another family: SD 1.x 768,
SD 2.x 1024) are refused.

Tokens follow diffusers' `load_textual_inversion`: `name` for a single vector; `name`, `name_1`, ...,
`name_{n-1}` for n vectors, added in argument order after the tokenizer's last id. A name that is
already a token, or a word of the vocabulary (the tokenizer matches added tokens case-insensitively,
so "Cat" would capture every "cat"), is refused. A multi-vector name in a prompt must become
"name name_1 ..." before tokenizing; the runtime does that, torch-free, with
`runtime.text.tokens.expand_embeddings` and the table `embedding_table` returns, which the manifest keeps
under `tokenizer["embeddings"]`.

The tokens are written into `tokenizer_config.json`'s `added_tokens_decoder` (read by transformers
>= 4.34 whether it builds the Python or the Rust tokenizer); a `tokenizer.json` of the source is not
carried over, so the four files stay the one definition of the tokenizer.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from export.convert_ldm import CheckpointError
from export.hashing import file_sha256

__all__ = ["EmbeddingError", "EmbeddingSpec", "add_tokens", "apply_embeddings", "embedding_record", "embedding_specs",
           "embedding_table", "embedding_tokens", "read_embedding"]

_TORCH_SUFFIXES = (".pt", ".bin", ".pth")


class EmbeddingError(CheckpointError):
    """A textual-inversion file that cannot be added to this model (format, width, token name)."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """One `--embedding FILE[:TOKEN]` argument; `token` is the file's stem unless given."""

    path: Path
    token: str


# ------------------------------------------------------------------------------------- arguments


def _spec(path: str | os.PathLike, token: str | None = None) -> EmbeddingSpec:
    path = Path(path).expanduser()
    if not path.is_file():
        raise EmbeddingError(f"embedding file {path} does not exist (expected FILE[:TOKEN])")
    token = path.stem if token is None else token
    if not token or any(c.isspace() for c in token):
        raise EmbeddingError(f"embedding {path}: the token {token!r} must be one word without spaces")
    return EmbeddingSpec(path, token)


def embedding_specs(items: Iterable[str | os.PathLike | tuple[str | os.PathLike, str] | EmbeddingSpec]
                    ) -> tuple[EmbeddingSpec, ...]:
    """Normalize `build_engine(embeddings=...)`: "FILE[:TOKEN]" strings (an argument that is itself
    an existing file is a file name even with a ':'), paths, (path, token) pairs or `EmbeddingSpec`s.
    Tokens must differ (case-insensitively: the tokenizer lower-cases)."""
    specs = []
    for item in items:
        if isinstance(item, EmbeddingSpec):
            specs.append(_spec(item.path, item.token))
        elif isinstance(item, tuple):
            specs.append(_spec(item[0], item[1]))
        elif isinstance(item, str) and ":" in item and not Path(item).is_file():
            path, _, token = item.rpartition(":")
            specs.append(_spec(path, token))
        else:
            specs.append(_spec(item))
    names = [s.token.lower() for s in specs]
    clash = sorted({s.token for s in specs if names.count(s.token.lower()) > 1})
    if clash:
        raise EmbeddingError(f"two embeddings share the token(s) {', '.join(clash)}; give one another name "
                             "(FILE:TOKEN)")
    return tuple(specs)


def embedding_tokens(name: str, n_vectors: int) -> list[str]:
    """The tokens of an n-vector embedding: [name, name_1, ..., name_{n-1}] (diffusers'
    `_extend_tokens_and_embeddings`)."""
    return [name] + [f"{name}_{i}" for i in range(1, n_vectors)]


# ---------------------------------------------------------------------------------------- reading


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EmbeddingError(f"{path}: the pickle holds Python objects other than tensors and plain data, which are "
                             f"not loaded for safety (torch.load weights_only=True): {e}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise EmbeddingError(f"{path}: not a readable PyTorch file (truncated or corrupt?): {e}") from e


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError) as e:
        raise EmbeddingError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e


def _vectors_of(data: Any, path: Path) -> Any:
    """The vectors of a loaded file, whatever its format (module doc)."""
    if not isinstance(data, dict):
        return data
    if isinstance(data.get("string_to_param"), dict):  # A1111 .pt
        params = data["string_to_param"]
        if "*" not in params:
            raise EmbeddingError(f"{path}: string_to_param has no '*' entry (keys: {', '.join(map(str, params))})")
        return params["*"]
    if {"clip_l", "clip_g"} <= set(data):
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l and clip_g vectors); only SDXL models take it")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1:
        raise EmbeddingError(f"{path}: expected one tensor (A1111 emb_params, or diffusers {{token: vectors}}), found "
                             f"{len(tensors)}: {', '.join(sorted(tensors)[:5])}")
    return next(iter(tensors.values()))


def _read_file(path: Path) -> Any:
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    if path.suffix.lower() in _TORCH_SUFFIXES:
        return _read_torch(path)
    raise EmbeddingError(f"{path}: unsupported embedding file {path.suffix!r}; expected .safetensors or "
                         f"{', '.join(_TORCH_SUFFIXES)}")


def read_embedding_parts(path: str | os.PathLike, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """{text encoder network: float32 [n, hidden]}: {"text_encoder": ...} of an SD 1.x / 2.x file, or
    with `sdxl` {"text_encoder": clip_l, "text_encoder_2": clip_g} of an SDXL file (module doc)."""
    path = Path(path)
    if not sdxl:
        return {"text_encoder": read_embedding(path)}
    data = _read_file(path)
    if not isinstance(data, dict) or not {"clip_l", "clip_g"} <= set(data):
        raise EmbeddingError(f"{path}: not an SDXL embedding (clip_l and clip_g vectors), which SDXL models need")
    parts = {network: _checked(data[key], path) for network, key in (("text_encoder", "clip_l"),
                                                                       ("text_encoder_2", "clip_g"))}
    if parts["text_encoder"].shape[0] != parts["text_encoder_2"].shape[0]:
        raise EmbeddingError(f"{path}: clip_l has {parts['text_encoder'].shape[0]} vectors, clip_g "
                             f"{parts['text_encoder_2'].shape[0]}")
    return parts


def read_embedding(path: str | os.PathLike) -> torch.Tensor:
    """The vectors of a textual-inversion file, float32 [n, hidden] (n >= 1)."""
    path = Path(path)
    return _checked(_vectors_of(_read_file(path), path), path)


def _checked(vectors: Any, path: Path) -> torch.Tensor:
    """Float vectors [hidden] or [n, hidden] as float32 [n, hidden]; anything else is refused."""
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point() or vectors.ndim not in (1, 2) \
            or vectors.numel() == 0:
        what = f"a {tuple(vectors.shape)} {vectors.dtype} tensor" if isinstance(vectors, torch.Tensor) \
            else type(vectors).__name__
        raise EmbeddingError(f"{path}: expected float vectors [hidden] or [n, hidden], found {what}")
    return vectors.detach().reshape(-1, vectors.shape[-1]).float()


def embedding_record(spec: EmbeddingSpec) -> dict[str, Any]:
    """What the manifest's `source` records of one embedding (part of the folder's reuse key)."""
    data = _read_file(spec.path)
    sdxl = isinstance(data, dict) and {"clip_l", "clip_g"} <= set(data)
    vectors = read_embedding_parts(spec.path, sdxl)["text_encoder"]
    return {"file": spec.path.name, "path": str(spec.path.resolve()), "sha256": file_sha256(spec.path),
            "token": spec.token, "vectors": int(vectors.shape[0])}


def embedding_table(records: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """{name: [name, name_1, ...]} of `embedding_record`s: the manifest's tokenizer["embeddings"]."""
    return {r["token"]: embedding_tokens(r["token"], r["vectors"]) for r in records}


# ------------------------------------------------------------------------------------ tokenizer


def _load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _check_names(tokens: Sequence[str], vocab: dict[str, int], where: Path) -> None:
    """Refuse tokens that the vocabulary already has, as a token or (case-insensitively) as a word."""
    taken = [t for t in tokens if t in vocab or t.lower() in vocab or f"{t.lower()}</w>" in vocab]
    if taken:
        raise EmbeddingError(f"{where}: token(s) {', '.join(taken)} already in the tokenizer's vocabulary; name the "
                             "embedding otherwise (--embedding FILE:TOKEN)")


def add_tokens(tokenizer_dir: str | os.PathLike, tokens: Sequence[str], out_dir: str | os.PathLike) -> list[int]:
    """Write the tokenizer of `tokenizer_dir` with `tokens` added (ids after its last one) into
    `out_dir`; return their ids, checked by loading `out_dir` back as the runtime does."""
    src, out = Path(tokenizer_dir), Path(out_dir)
    base = len(_load_tokenizer(src))
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "tokenizer.json":
            shutil.copyfile(f, out / f.name)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    added = dict(config.get("added_tokens_decoder") or {})
    ids = list(range(base, base + len(tokens)))
    for token, i in zip(tokens, ids):
        # as transformers' add_tokens(str) makes them: matched on normalized (lower-cased) text
        added[str(i)] = {"content": token, "lstrip": False, "rstrip": False, "normalized": True,
                         "single_word": False, "special": False}
    config_file.write_text(json.dumps({**config, "added_tokens_decoder": added}, indent=2) + "\n", encoding="utf-8")
    got = _load_tokenizer(out).convert_tokens_to_ids(list(tokens))
    if got != ids:
        raise EmbeddingError(f"the tokenizer written to {out} gives the new tokens ids {got}, expected {ids}")
    return ids


def _scratch_dir() -> Path:
    """A temporary folder removed when the process exits (the model outlives any scope)."""
    folder = tempfile.mkdtemp(prefix="sdrt-tokenizer-")
    atexit.register(shutil.rmtree, folder, True)
    return Path(folder)


# ------------------------------------------------------------------------------------------ apply


def _grown_table(table: nn.Embedding, base: int, vectors: torch.Tensor) -> nn.Embedding:
    """A new embedding table: the first `base` rows of `table` (the ids the tokenizer can give),
    then `vectors`."""
    if table.weight.shape[0] < base:
        raise EmbeddingError(f"the tokenizer has {base} tokens but the text encoder's table only "
                             f"{table.weight.shape[0]} rows")
    weight = torch.cat([table.weight.detach()[:base], vectors.to(table.weight.dtype)])
    grown = nn.Embedding(weight.shape[0], weight.shape[1])
    grown.weight = nn.Parameter(weight, requires_grad=False)
    return grown


def apply_embeddings(model: Any, specs: Sequence[EmbeddingSpec], progress: Any = None) -> Any:
    """`model` (an export.loading.read.LoadedModel) with every embedding of `specs` added: a new
    tokenizer folder, and the text encoder's token table grown by the vectors (the text encoder
    itself is updated in place; the returned model carries the new tokenizer folder and spec)."""
    if not specs:
        return model
    # SDXL: clip_l and clip_g vectors, the refiner (no text_encoder) clip_g alone
    encoders = {n: getattr(model, n) for n in ("text_encoder", "text_encoder_2") if getattr(model, n, None) is not None}
    sdxl = "text_encoder_2" in encoders
    vocab = _load_tokenizer(Path(model.tokenizer_dir or model.tokenizer_2_dir)).get_vocab()
    tokens, vectors = [], {network: [] for network in encoders}
    for spec in specs:
        parts = read_embedding_parts(spec.path, sdxl=sdxl)
        for network in encoders:
            v = parts[network]
            hidden = encoders[network].get_input_embeddings().weight.shape[1]
            if v.shape[1] != hidden:
                what = "text encoder" if network == "text_encoder" else "second text encoder"
                raise EmbeddingError(f"{spec.path}: vectors of width {v.shape[1]}, but this {model.spec.family} "
                                     f"{what}'s width is {hidden}: the embedding is for another model family "
                                     "(SD 1.x 768, SD 2.x 1024, SDXL 768 and 1280)")
            vectors[network].append(v)
        n = v.shape[0]  # the same for clip_l and clip_g (read_embedding_parts)
        _check_names(embedding_tokens(spec.token, n), vocab, spec.path)
        tokens += embedding_tokens(spec.token, n)
        if progress is not None:
            progress(f"  embedding {spec.path.name}: token {spec.token!r}, {n} vector(s)")
    changes: dict[str, Any] = {}
    for network, encoder in encoders.items():
        folder = _scratch_dir()
        source = model.tokenizer_dir if network == "text_encoder" else model.tokenizer_2_dir
        ids = add_tokens(source, tokens, folder)
        encoder.set_input_embeddings(_grown_table(encoder.get_input_embeddings(), ids[0], torch.cat(vectors[network])))
        encoder.config.vocab_size = ids[-1] + 1
        config = getattr(model.spec, network)
        changes[network] = {**config, "vocab_size": ids[-1] + 1}
        changes["tokenizer_dir" if network == "text_encoder" else "tokenizer_2_dir"] = folder
    spec = replace(model.spec, **{k: v for k, v in changes.items() if k in encoders})
    return replace(model, spec=spec, **{k: v for k, v in changes.items() if k.startswith("tokenizer")})

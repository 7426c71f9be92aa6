"""What a build adds to its source's weights: LoRA files (export/lora.py) and textual-inversion
embeddings (export/embeddings.py), as one object that export/build.py hashes into the folder's
identity, applies to the loaded model before export, and records in the manifest.

The manifest's `source` gains "loras": [{"file", "path", "sha256", "scale"}] and "embeddings":
[{"file", "path", "sha256", "token", "vectors"}] (each key only when non-empty, so folders built
without them keep their identity). They are part of the reuse key: a changed file, scale or token
rebuilds the folder; the same arguments reuse it. As with the source itself, a file's path is not
compared (`comparable`), so moving a file rebuilds nothing. The tokenizer entry gains
"embeddings": {name: [name, name_1, ...]}, the table the runtime expands prompts with
(`runtime.text.tokens.expand_embeddings`).

torch is imported only when something is applied, so export/build.py can import this module at
no cost.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

Progress = Any  # callable(str)


@dataclass(frozen=True)
class Adapters:
    """The LoRAs (`export.lora.LoraSpec`) and embeddings (`export.embeddings.EmbeddingSpec`) of one
    build request, with their manifest records computed once (files hashed, vectors counted)."""

    loras: tuple = ()
    embeddings: tuple = ()
    lora_records: tuple = field(default=(), compare=False)
    embedding_records: tuple = field(default=(), compare=False)

    def identity(self) -> dict[str, Any]:
        """The keys this request adds to the source identity (none when it adds nothing)."""
        out: dict[str, Any] = {}
        if self.lora_records:
            out["loras"] = [dict(r) for r in self.lora_records]
        if self.embedding_records:
            out["embeddings"] = [dict(r) for r in self.embedding_records]
        return out

    def apply(self, model: Any, progress: Progress = None) -> Any:
        """`model` with the embeddings added and the LoRAs merged (see export/lora.py and
        export/embeddings.py for what changes in place; the SDXL refiner's take its one text encoder,
        text_encoder_2)."""
        if self.embeddings:
            from export.embeddings import apply_embeddings

            model = apply_embeddings(model, self.embeddings, progress)
        if self.loras:
            from export.lora import apply_loras

            model = apply_loras(model, self.loras, progress)
        return model

    def annotate(self, manifest: Any) -> Any:
        """The manifest with the embedding table in its tokenizer entry (unchanged without embeddings)."""
        if not self.embedding_records:
            return manifest
        from export.embeddings import embedding_table

        tokenizer = {**manifest.tokenizer, "embeddings": embedding_table(self.embedding_records)}
        return replace(manifest, tokenizer=tokenizer)


def adapters(loras: Iterable[Any] = (), embeddings: Iterable[Any] = ()) -> Adapters:
    """Parse and hash `build_engine(loras=..., embeddings=...)` (see `export.lora.lora_specs` and
    `export.embeddings.embedding_specs` for the accepted spellings). Missing files and bad arguments
    raise `LoraError` / `EmbeddingError` here, before any work."""
    loras, embeddings = (((x,) if isinstance(x, (str, os.PathLike)) else tuple(x or ())) for x in (loras, embeddings))
    if not loras and not embeddings:
        return Adapters()
    from export.embeddings import embedding_record, embedding_specs
    from export.lora import lora_record, lora_specs

    lora_list, embedding_list = lora_specs(loras), embedding_specs(embeddings)
    return Adapters(lora_list, embedding_list, tuple(lora_record(s) for s in lora_list),
                    tuple(embedding_record(s) for s in embedding_list))


def comparable(identity: dict[str, Any]) -> dict[str, Any]:
    """A source identity without paths (top level, per LoRA / embedding / ControlNet file, the --vae
    file): what two builds must share to be the same."""
    out = {k: v for k, v in identity.items() if k != "path"}
    for key in ("loras", "embeddings", "controlnets"):
        if key in out:
            out[key] = [{k: v for k, v in r.items() if k != "path"} for r in out[key]]
    if "vae" in out:  # build-engine --vae (export/loading/vae_source.py)
        out["vae"] = {k: v for k, v in out["vae"].items() if k != "path"}
    return out


def apply_recorded(model: Any, source: dict[str, Any], progress: Progress = None) -> Any:
    """Re-apply the LoRAs and embeddings a manifest's `source` records to a freshly loaded `model`
    (for the PyTorch reference engine, which rebuilds the model from the source). Each file must
    still be at its recorded path with its recorded sha256."""
    from export.convert_ldm import CheckpointError
    from export.hashing import file_sha256

    loras = [(r["path"], r["scale"]) for r in source.get("loras", [])]
    embeddings = [(r["path"], r["token"]) for r in source.get("embeddings", [])]
    for record in [*source.get("loras", []), *source.get("embeddings", [])]:
        if not os.path.isfile(record["path"]) or file_sha256(record["path"]) != record["sha256"]:
            raise CheckpointError(f"{record['path']} is gone or changed since the engine folder was built "
                                  f"(sha256 {record['sha256'][:12]}...)")
    return adapters(loras, embeddings).apply(model, progress)

"""Prompt tokenization and encoding, in 77-token chunks.

CLIP sees at most 77 tokens (BOS + 75 + EOS). A longer prompt is split into chunks of 75 tokens;
each chunk becomes its own 77-token sequence (BOS + up to 75 tokens + EOS, then padding), the text
encoder runs on every chunk, and the hidden states are concatenated along the token axis, so the
U-Net sees 77 * n_chunks tokens (the `tokens` axis of the network contract). The negative prompt is
padded with empty chunks (BOS + EOS + padding) to the prompt's chunk count, and the other way round,
so the conditional and unconditional batches have one shape. A prompt of at most 75 tokens gives
exactly the ids diffusers' `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`
gives.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from runtime.engines.base import Engine
from runtime.folder.networks import TEXT_MAX_LENGTH


def load_tokenizer(tokenizer_dir: str | Path, pad_token: str | None = None):
    """The CLIP BPE tokenizer of an engine folder (`tokenizer/`: vocab.json, merges.txt, ...).
    transformers' CLIPTokenizer is pure Python here: no torch."""
    from transformers import CLIPTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    for name in ("vocab.json", "merges.txt"):
        if not (tokenizer_dir / name).is_file():
            raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} lacks {name}")
    kwargs = {"pad_token": pad_token} if pad_token else {}
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, **kwargs)
    # a pad token outside the vocabulary would be added with a new id past the text encoder's embedding
    # table (an out-of-range lookup at the first prompt: an error on ONNX Runtime, zeros on OpenVINO)
    pad = tokenizer.pad_token_id
    if pad is None or not 0 <= pad < tokenizer.vocab_size:
        raise ValueError(f"the pad token {pad_token!r} is not in the vocabulary of {tokenizer_dir} "
                         f"({tokenizer.vocab_size} tokens)")
    return tokenizer


def token_ids(tokenizer, text: str) -> list[int]:
    """The prompt's BPE ids without BOS/EOS and without truncation."""
    return list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


def chunk_ids(tokenizer, ids: Sequence[int], n_chunks: int, max_length: int = TEXT_MAX_LENGTH) -> np.ndarray:
    """[n_chunks, max_length] int32: each chunk BOS + up to (max_length - 2) ids + EOS, then padding.
    Chunks past the end of `ids` are empty (BOS + EOS + padding)."""
    body = max_length - 2
    out = np.full((n_chunks, max_length), tokenizer.pad_token_id, dtype=np.int32)
    for k in range(n_chunks):
        part = list(ids[k * body:(k + 1) * body])
        row = [tokenizer.bos_token_id, *part, tokenizer.eos_token_id]
        out[k, :len(row)] = row
    return out


def n_chunks_for(n_ids: int, max_length: int = TEXT_MAX_LENGTH) -> int:
    """Chunks needed for a prompt of n_ids BPE ids (at least one: the empty prompt is BOS + EOS)."""
    body = max_length - 2
    return max(1, -(-n_ids // body))


def tokenize(tokenizer, prompts: Sequence[str], min_chunks: int = 1,
             max_length: int = TEXT_MAX_LENGTH) -> np.ndarray:
    """[len(prompts), n_chunks, max_length] int32, n_chunks = max(min_chunks, chunks of the longest prompt)."""
    ids = [token_ids(tokenizer, p) for p in prompts]
    n = max([min_chunks] + [n_chunks_for(len(i), max_length) for i in ids])
    return np.stack([chunk_ids(tokenizer, i, n, max_length) for i in ids])


def encode(engine: Engine, ids: np.ndarray, output: str = "last_hidden_state") -> np.ndarray:
    """Run the text encoder on [batch, n_chunks, 77] ids, one chunk position at a time (the
    engine batch stays the prompt count), and concatenate: float32 [batch, n_chunks * 77, hidden]."""
    return encode_outputs(engine, ids, output)[0]


def encode_outputs(engine: Engine, ids: np.ndarray, output: str = "last_hidden_state",
                   pooled: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """`encode`, and the encoder's `pooled` output of the first chunk ([batch, width]; None without
    `pooled`): A1111 modules/sd_hijack_clip.py takes the pooled output of chunk 0 (`zs[0].pooled`)."""
    if ids.ndim != 3:
        raise ValueError(f"expected ids of shape [batch, chunks, tokens]; got {ids.shape}")
    runs = [engine.run({"input_ids": ids[:, k, :]}) for k in range(ids.shape[1])]
    hidden = np.concatenate([r[output] for r in runs], axis=1)
    return hidden, None if pooled is None else runs[0][pooled]


def expand_embeddings(prompt: str, embeddings: Mapping[str, Sequence[str]]) -> str:
    """The prompt with each multi-vector textual-inversion name written out as all its tokens, as
    diffusers' `maybe_convert_prompt` does before tokenizing: "a <style> cat" with
    {"<style>": ["<style>", "<style>_1", "<style>_2"]} -> "a <style> <style>_1 <style>_2 cat".

    `embeddings` is the engine folder's manifest tokenizer["embeddings"] table (export/embeddings.py).
    Names are found as the tokenizer finds added tokens: anywhere in the text, case-insensitively
    (CLIP lower-cases; diffusers' own check misses upper-case names), the longest token first, so
    a literal "<style>_1" stays one token. Single-vector names and empty tables leave the prompt as it is."""
    if not any(len(tokens) > 1 for tokens in embeddings.values()):
        return prompt
    expansion = {token.lower(): token for tokens in embeddings.values() for token in tokens}
    expansion.update({name.lower(): " ".join(tokens) for name, tokens in embeddings.items()})
    return _token_pattern(expansion).sub(lambda m: expansion[m.group(0).lower()], prompt)


def embeddings_used(prompts: Sequence[str], embeddings: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """The names of `embeddings` (a manifest tokenizer["embeddings"] table) whose tokens `prompts`
    hold, found as `expand_embeddings` finds them; sorted."""
    if not embeddings:
        return ()
    owner = {token.lower(): name for name, tokens in embeddings.items() for token in [name, *tokens]}
    pattern = _token_pattern(owner)
    return tuple(sorted({owner[m.group(0).lower()] for p in prompts for m in pattern.finditer(p)}))


def _token_pattern(tokens: Iterable[str]) -> re.Pattern:
    """Any of `tokens`, case-insensitively, the longest first (so "<style>_1" is not "<style>" + "_1")."""
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)), re.IGNORECASE)

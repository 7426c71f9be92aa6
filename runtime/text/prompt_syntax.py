"""AUTOMATIC1111's prompt syntax: emphasis weights and BREAK, over our 77-token chunks.

Syntax (A1111 wiki, "Features" > "Attention/emphasis" and "BREAK keyword"; the rules below are
those of `parse_prompt_attention` in A1111's modules/prompt_parser.py, v1.10):

    (word)        weight x 1.1          ((word))   x 1.21 (each pair multiplies)
    (word:1.3)    weight x 1.3          [word]     weight / 1.1 (no explicit weight with [])
    \\( \\) \\[ \\] \\\\   the literal character; a lone backslash is dropped
    BREAK         (upper case, a whole word) ends the current 75-token chunk
    unbalanced    an unclosed ( or [ applies its factor up to the end of the prompt; a ) or ]
                  with nothing open is literal text

A1111 quirks kept on purpose, so prompts encode as A1111 encodes them: adjacent fragments of equal
weight are merged; a BREAK inside brackets is not a break (A1111 multiplies its marker weight, -1,
like any text, and then encodes the word "BREAK" with that negative weight); a weight that is not a
number, as in `(word:1.2.3)`, is an error (A1111 raises too).

Encoding (A1111 modules/sd_hijack_clip.py `tokenize_line`): every fragment is tokenized on its
own, its ids carry its weight, and the ids are cut into chunks of 75 by runtime/text/tokens.py's rule
(BOS + up to 75 ids + EOS + padding; BOS, EOS and padding weigh 1.0). BREAK closes the current chunk
(an empty one too, as in A1111). A1111 also moves the words after the last comma into the next
chunk when that comma lies within `comma_padding_backtrack` (default 20) tokens of a full chunk; we
do not by default (`comma_backtrack=0`), because then an unweighted prompt gets exactly the chunks
of runtime/text/tokens.py, and long prompts keep today's images. `comma_backtrack=A1111_COMMA_BACKTRACK`
gives A1111's chunking.

Weighting (A1111 modules/sd_emphasis.py `EmphasisOriginal.after_transformers`): per chunk, the
text encoder's output z [77, hidden] becomes z * w, rescaled so that its mean over all tokens and
channels equals the mean before weighting. A1111 takes that mean over the batch it encodes in one
call, which holds one prompt (the batch is the prompt-editing variants of one prompt, a feature we
do not have), so the mean here is per prompt and per chunk: `apply_weights`.

When to use it: `has_weighting(prompt)` says whether the syntax changes what the text encoder
sees. Callers keep runtime/text/tokens.py's path when no prompt of a request has any; with all weights 1
`apply_weights` returns its input bit for bit anyway. Literal parentheses a user did not mean as
weighting, "photo (35mm)", are weighting to A1111 and here (x1.1); write `\\(35mm\\)`, or pass
`syntax="none"` to read every prompt literally (A1111's emphasis setting "None").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from runtime.text import tokens as text
from runtime.errors import PipelineError
from runtime.folder.networks import TEXT_MAX_LENGTH

__all__ = ["A1111_COMMA_BACKTRACK", "BREAK", "SYNTAXES", "PromptSyntaxError", "apply_weights", "count_chunks",
           "has_weighting", "pad_chunks", "parse_prompt_attention", "tokenize_weighted", "weighted_token_chunks"]

SYNTAXES = ("a1111", "none")
ROUND_FACTOR = 1.1  # A1111 prompt_parser.py: round_bracket_multiplier
SQUARE_FACTOR = 1 / 1.1  # A1111 prompt_parser.py: square_bracket_multiplier
A1111_COMMA_BACKTRACK = 20  # A1111 shared_options.py: comma_padding_backtrack default
BREAK = ("BREAK", -1.0)  # the fragment A1111's parser emits for a BREAK

# One syntax element per match, in A1111's order of precedence (prompt_parser.py `re_attention`).
_ELEMENT = re.compile(r"""
      (?P<escape>\\[()\[\]\\]|\\)            # \( \) \[ \] \\ , or a lone backslash
    | (?P<open>[(\[])
    | :(?P<weight>[+-]?[.\d]+)\)              # ":1.3)" closes a round bracket with a weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)  # A1111 prompt_parser.py `re_break`


class PromptSyntaxError(PipelineError):
    """A prompt that A1111's syntax cannot read (a bracket weight that is not a number)."""


def parse_prompt_attention(prompt: str) -> list[tuple[str, float]]:
    """[(text, weight), ...] with A1111's semantics; a BREAK is the fragment `BREAK`.
    The empty prompt is [("", 1.0)]."""
    res: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _ELEMENT.finditer(prompt):
        token = m.group(0)
        if m.group("escape"):
            res.append([token[1:], 1.0])
        elif m.group("open"):
            (round_open if token == "(" else square_open).append(len(res))
        elif m.group("weight") is not None and round_open:
            multiply(round_open.pop(), _number(m.group("weight"), prompt))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_FACTOR)
        else:  # text, ':', an unmatched closer, or ':1.3)' with no round bracket open
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_FACTOR)
    for start in square_open:
        multiply(start, SQUARE_FACTOR)
    return _merge_equal_weights(res)


def _number(value: str, prompt: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PromptSyntaxError(f"prompt {prompt!r}: the emphasis weight {value!r} in '(...:{value})' is not "
                                "a number (escape literal brackets as \\( \\))") from None


def _merge_equal_weights(res: list[list[Any]]) -> list[tuple[str, float]]:
    """A1111's last pass: neighbours of equal weight become one fragment."""
    merged: list[list[Any]] = []
    for text_, weight in res or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text_
        else:
            merged.append([text_, weight])
    return [(t, float(w)) for t, w in merged]


def has_weighting(prompt: str) -> bool:
    """Whether A1111's syntax changes what the text encoder sees: any weight other than 1, a BREAK,
    or an escape or bracket that is dropped from the text."""
    return parse_prompt_attention(prompt) != [(prompt, 1.0)]


def _fragments(prompt: str, syntax: str) -> list[tuple[str, float]]:
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt syntax must be one of {', '.join(SYNTAXES)}; got {syntax!r}")
    return parse_prompt_attention(prompt) if syntax == "a1111" else [(prompt, 1.0)]


def _chunk_bodies(tokenizer: Any, prompt: str, body: int, comma_backtrack: int,
                  syntax: str) -> list[tuple[list[int], list[float]]]:
    """The (ids, weights) of each chunk without BOS/EOS/padding (A1111 `tokenize_line`)."""
    comma = tokenizer.convert_tokens_to_ids(",</w>") if comma_backtrack else None
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for fragment, weight in _fragments(prompt, syntax):
        if (fragment, weight) == BREAK:
            chunks.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        for token in text.token_ids(tokenizer, fragment):
            if token == comma:
                last_comma = len(ids)
            elif comma_backtrack and len(ids) == body and last_comma != -1 and body - last_comma <= comma_backtrack:
                cut = last_comma + 1  # the words after the comma move to the next chunk
                chunks.append((ids[:cut], weights[:cut]))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == body:
                chunks.append((ids, weights))
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def weighted_token_chunks(tokenizer: Any, prompt: str, max_length: int = TEXT_MAX_LENGTH, *,
                          comma_backtrack: int = 0, syntax: str = "a1111") -> tuple[np.ndarray, np.ndarray]:
    """(ids [n_chunks, max_length] int32, weights [n_chunks, max_length] float32) of one prompt:
    each chunk BOS + up to max_length - 2 ids + EOS + padding (runtime/text/tokens.py `chunk_ids`), the
    special tokens weighing 1.0."""
    if isinstance(comma_backtrack, bool) or not isinstance(comma_backtrack, int) or comma_backtrack < 0:
        raise ValueError(f"comma_backtrack must be a non-negative integer; got {comma_backtrack!r}")
    bodies = _chunk_bodies(tokenizer, prompt, max_length - 2, comma_backtrack, syntax)
    ids = np.concatenate([text.chunk_ids(tokenizer, body, 1, max_length) for body, _ in bodies])
    weights = np.ones(ids.shape, dtype=np.float32)
    for k, (_, w) in enumerate(bodies):
        weights[k, 1:1 + len(w)] = w
    return ids, weights


def count_chunks(tokenizer: Any, prompt: str, max_length: int = TEXT_MAX_LENGTH, *, comma_backtrack: int = 0,
                 syntax: str = "a1111") -> int:
    """How many chunks `weighted_token_chunks` gives the prompt."""
    return len(_chunk_bodies(tokenizer, prompt, max_length - 2, comma_backtrack, syntax))


def pad_chunks(tokenizer: Any, ids: np.ndarray, weights: np.ndarray, n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """Append empty chunks (BOS + EOS + padding, weights 1) up to `n_chunks`, as runtime/text/tokens.py pads
    the negative prompt to the prompt's chunk count and the other way round. New arrays."""
    if ids.shape != weights.shape or ids.ndim != 2:
        raise ValueError(f"ids and weights must both be [chunks, tokens]; got {ids.shape} and {weights.shape}")
    if n_chunks < ids.shape[0]:
        raise ValueError(f"cannot pad {ids.shape[0]} chunks down to {n_chunks}")
    extra = n_chunks - ids.shape[0]
    empty = text.chunk_ids(tokenizer, [], extra, ids.shape[1])
    return (np.concatenate([ids, empty]).astype(np.int32),
            np.concatenate([weights, np.ones(empty.shape, np.float32)]).astype(np.float32))


def tokenize_weighted(tokenizer: Any, prompts: Sequence[str], min_chunks: int = 1,
                      max_length: int = TEXT_MAX_LENGTH, *, comma_backtrack: int = 0,
                      syntax: str = "a1111") -> tuple[np.ndarray, np.ndarray]:
    """The weighted counterpart of runtime/text/tokens.py `tokenize`: (ids [batch, n_chunks, max_length]
    int32, weights [batch, n_chunks * max_length] float32), n_chunks = max(min_chunks, chunks of
    the longest prompt). Feed ids to `text.encode` and its output with the weights to `apply_weights`."""
    rows = [weighted_token_chunks(tokenizer, p, max_length, comma_backtrack=comma_backtrack, syntax=syntax)
            for p in prompts]
    n = max([min_chunks] + [ids.shape[0] for ids, _ in rows])
    padded = [pad_chunks(tokenizer, ids, w, n) for ids, w in rows]
    return np.stack([i for i, _ in padded]), np.stack([w.reshape(-1) for _, w in padded])


def apply_weights(hidden: np.ndarray, weights: np.ndarray, chunk_length: int = TEXT_MAX_LENGTH) -> np.ndarray:
    """A1111's emphasis on text-encoder output: hidden [batch, n_chunks * chunk_length, dim] times
    weights [batch, n_chunks * chunk_length], then each (prompt, chunk) block rescaled so its mean
    over tokens and channels is the mean it had before. A new array of hidden's dtype; with all
    weights 1 it equals `hidden` bit for bit."""
    if hidden.ndim != 3 or weights.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [batch, tokens, dim] and weights [batch, tokens]; got {hidden.shape} "
                         f"and {weights.shape}")
    b, t, d = hidden.shape
    if t % chunk_length:
        raise ValueError(f"the token axis ({t}) is not a whole number of {chunk_length}-token chunks")
    z = hidden.reshape(b, t // chunk_length, chunk_length, d)
    original = z.mean(axis=(2, 3), dtype=np.float64)
    z = z * weights.reshape(b, t // chunk_length, chunk_length, 1).astype(hidden.dtype)
    new = z.mean(axis=(2, 3), dtype=np.float64)
    if not np.all(np.isfinite(new)) or np.any(new == 0):
        bad = np.argwhere(~np.isfinite(new) | (new == 0))[0]
        raise ValueError(f"prompt {bad[0]}, chunk {bad[1]}: the weighted hidden states have mean {new[tuple(bad)]}, "
                         "so A1111's mean restoration cannot rescale them; change the emphasis weights")
    scale = (original / new).astype(hidden.dtype)
    return (z * scale[:, :, None, None]).reshape(b, t, d)

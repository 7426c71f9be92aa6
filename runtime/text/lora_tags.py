"""A1111's LoRA tags in prompts, `<lora:NAME:WEIGHT>` (and `<lyco:...>`, its LyCORIS spelling),
as people copy them with prompts from model sites. We fuse LoRAs at build time (export/lora.py,
`build-engine --lora FILE:SCALE`, recorded in the manifest's `source.loras`), so a tag is never
encoded as words: it is honoured by a folder built with that LoRA at that weight (the tag is then
removed from the text the encoder reads), or refused (PipelineError, field "prompt") naming the
tag and what the folders offer.

Syntax, as A1111 v1.10 reads it (modules/extra_networks.py `re_extra_net = <(\\w+):([^>]+)>`, the
arguments split on ":"; extensions-builtin/Lora/extra_networks_lora.py `activate`): NAME, then
the text-encoder multiplier (default 1.0), then the U-Net multiplier (default: the text
encoder's); `te=`, `unet=` and `dyn=` name them. A fused LoRA has one scale for both networks, so
different te and unet weights, and `dyn`, are refused. A1111 reads tags in the positive prompt only
and its negative prompt keeps them as words; we refuse a tag there instead of encoding it. The
NAME is the LoRA file's stem (A1111's default "Lora name" for the tag). A `<lora:` left unclosed
is refused too.

Parsed once per request, in request preparation (Pipeline.request, or the server's routing,
which hands the parse to Pipeline.request).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from runtime.errors import PipelineError

__all__ = ["KINDS", "LoraTag", "TaggedPrompts", "describe_offer", "folder_loras", "has_tags", "missing",
           "parse_prompts"]

KINDS = ("lora", "lyco")  # A1111's Lora extension registers both names for one network type
_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111 modules/extra_networks.py re_extra_net
_OPEN = re.compile(r"<(lora|lyco):", re.IGNORECASE)  # an opening left in the text once the tags are gone


@dataclass(frozen=True)
class LoraTag:
    """One tag: its LoRA name, its weight, and the text as written (for messages)."""

    name: str
    weight: float
    text: str


@dataclass(frozen=True)
class TaggedPrompts:
    """Prompts with their LoRA tags taken out. `source`: the prompts as given (they stay in the
    parameters and PNG info, as A1111 keeps them); `text`: what the text encoder reads; `tags`:
    each distinct (name, weight) once, in order of first appearance."""

    source: tuple[str, ...]
    text: tuple[str, ...]
    tags: tuple[LoraTag, ...]


def _weight(value: str, tag: str) -> float:
    try:
        w = float(value)
    except ValueError:
        raise PipelineError(f"LoRA tag {tag}: weight {value!r} is not a number", field="prompt") from None
    if not math.isfinite(w):
        raise PipelineError(f"LoRA tag {tag}: weight {value!r} is not finite", field="prompt")
    return w


def _tag(args: str, tag: str) -> LoraTag:
    """A1111's argument rule: positional name, te, unet, dyn, or te=/unet=/dyn= by name."""
    parts = args.split(":")
    name, named, positional = parts[0].strip(), {}, []
    for p in parts[1:]:
        key, sep, value = p.partition("=")
        if sep:
            if key.strip() not in ("te", "unet", "dyn"):
                raise PipelineError(f"LoRA tag {tag}: unknown argument {key.strip()!r} (A1111 knows te=, unet=, dyn=)",
                                    field="prompt")
            named[key.strip()] = value.strip()
        else:
            positional.append(p.strip())
    if not name:
        raise PipelineError(f"LoRA tag {tag}: no LoRA name (write <lora:NAME:WEIGHT>)", field="prompt")
    if len(positional) > 3:
        raise PipelineError(f"LoRA tag {tag}: too many arguments (A1111's are NAME:TE:UNET:DYN)", field="prompt")
    keys = ("te", "unet", "dyn")
    values = {**dict(zip(keys, positional)), **named}
    if "dyn" in values:
        raise PipelineError(f"LoRA tag {tag}: dyn (a rank cut) cannot apply to a LoRA fused at build time",
                            field="prompt")
    te = _weight(values["te"], tag) if "te" in values else 1.0
    unet = _weight(values["unet"], tag) if "unet" in values else te
    if te != unet:
        raise PipelineError(f"LoRA tag {tag}: text-encoder weight {te:g} and U-Net weight {unet:g} differ; a LoRA "
                            "fused at build time has one scale for both", field="prompt")
    return LoraTag(name, te, tag)


def _split(prompt: str, field: str) -> tuple[str, list[LoraTag]]:
    tags: list[LoraTag] = []

    def take(m: re.Match) -> str:
        if m.group(1) not in KINDS:
            return m.group(0)  # not a LoRA tag: left as A1111 would not read it as one either
        if field != "prompt":
            raise PipelineError(f"LoRA tag {m.group(0)} in the negative prompt: a LoRA cannot apply to the "
                                "negative prompt alone (A1111 encodes it there as words); remove it",
                                field=field)
        tags.append(_tag(m.group(2), m.group(0)))
        return ""

    text = _TAG.sub(take, prompt)
    left = _OPEN.search(text)
    if left:
        raise PipelineError(f"unclosed LoRA tag at {text[left.start():left.start() + 40]!r} (write "
                            "<lora:NAME:WEIGHT>)", field=field)
    return (text if len(tags) == 0 else _tidy(text)), tags


def _tidy(text: str) -> str:
    """The text around removed tags: no doubled commas or spaces left where a tag was."""
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return text.strip().strip(",").strip()


def parse_prompts(prompts: Sequence[str], negative_prompts: Sequence[str] = ()) -> TaggedPrompts:
    """Take the LoRA tags out of `prompts` (refusing bad syntax, and tags in `negative_prompts`)."""
    text, found = [], []
    for p in prompts:
        t, tags = _split(p, "prompt")
        text.append(t)
        found.extend(tags)
    for n in negative_prompts:
        _split(n, "negative_prompt")
    distinct: dict[tuple[str, float], LoraTag] = {}
    for t in found:
        distinct.setdefault((t.name, t.weight), t)
    names = [t.name for t in distinct.values()]
    for name in {n for n in names if names.count(n) > 1}:
        both = " and ".join(t.text for t in distinct.values() if t.name == name)
        raise PipelineError(f"LoRA tags {both}: one LoRA at two weights", field="prompt")
    return TaggedPrompts(tuple(prompts), tuple(text), tuple(distinct.values()))


def has_tags(text: str) -> bool:
    """Whether `text` holds a LoRA tag (or the start of one); a check, not the parse."""
    return _OPEN.search(text) is not None


def folder_loras(source: Mapping[str, Any]) -> dict[str, float]:
    """{LoRA name: scale} a folder was built with: its manifest `source.loras` records
    (export/adapters.py), named by file stem as A1111 names a LoRA."""
    out = {}
    for record in source.get("loras") or ():
        out[PurePath(str(record.get("file", ""))).stem] = float(record.get("scale", 1.0))
    return out


def missing(tags: Sequence[LoraTag], offered: Mapping[str, float]) -> list[LoraTag]:
    """The tags that a folder offering `offered` cannot honour (name absent, or another weight)."""
    return [t for t in tags if t.name not in offered or not math.isclose(offered[t.name], t.weight, rel_tol=0,
                                                                         abs_tol=1e-9)]


def describe_offer(offered: Mapping[str, float]) -> str:
    """'<lora:a:0.8> <lora:b:0.5>', or 'no LoRA'."""
    return " ".join(f"<lora:{n}:{w:g}>" for n, w in offered.items()) or "no LoRA"

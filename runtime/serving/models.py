"""The engine folders one server serves (`serve DIR1 DIR2 ...`), as A1111's checkpoints: listed by
`/sdapi/v1/sd-models`, picked per request by `override_settings.sd_model_checkpoint` (or OpenAI's
`model`), the default set by `POST /sdapi/v1/options {"sd_model_checkpoint": ...}`.

Memory stays bounded: at most `max_resident` folders are open at once (default 1, A1111's
`sd_checkpoints_limit` default in modules/shared_options.py). A request for a folder that is not
open opens it, first closing the least recently used open folder that no request is using; when
every open folder is in use, the request waits for one to come free (up to the server's timeout,
then 503). A closed folder opens again on demand.

LoRA tags route (runtime/text/lora_tags.py): a request whose prompt carries `<lora:NAME:WEIGHT>` tags
runs on the selected folder when it was built with those LoRAs at those weights, else on a served
folder that was (one built from the same source first, then the fewest other LoRAs), else it is
refused naming the tag and what each folder offers.

Threads: the open pipelines, their users and the LRU order are owned by `Models` and guarded by its
condition; the default model is one reference, swapped whole.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any

from runtime import scheduler as sch
from runtime.folder.manifest import Manifest, load_manifest
from runtime.errors import PipelineError
from runtime.pipeline import Pipeline
from runtime.request import Limits
from runtime.text import lora_tags

__all__ = ["DEFAULT_MAX_RESIDENT", "Model", "ModelBusy", "Models", "UnknownModel"]

log = logging.getLogger(__name__)
DEFAULT_MAX_RESIDENT = 1  # A1111 modules/shared_options.py: sd_checkpoints_limit defaults to 1
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # A1111 titles end in " [shorthash]"
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class UnknownModel(LookupError):
    """A model name that matches none of the served folders (the message lists them)."""


class ModelBusy(RuntimeError):
    """Every open folder is in use and no other may open (max_resident) within the wait."""


@dataclass(frozen=True, eq=False)
class Model:
    """One served engine folder, described from its manifest alone (nothing opened). `limits` are
    the folder's (without the memory model, which needs the engines) for the wire layer."""

    engine_dir: Path
    manifest: Manifest
    name: str
    limits: Limits
    loras: dict[str, float] = field(default_factory=dict)

    @property
    def hash(self) -> str | None:
        return (self.manifest.source or {}).get("sha256")

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash[:10]}]" if self.hash else self.name

    @property
    def base(self) -> tuple[Any, ...]:
        """The source the folder was built from, LoRAs aside (routing prefers the selected one's)."""
        s = self.manifest.source or {}
        return s.get("kind"), s.get("sha256"), s.get("preset"), s.get("path")

    def item(self) -> dict[str, Any]:
        """A1111's SDModelItem (modules/api/models.py): title, model_name, hash, sha256, filename, config."""
        h = self.hash
        return {"title": self.title, "model_name": self.name, "hash": h[:10] if h else None, "sha256": h,
                "filename": self.engine_dir.name, "config": None}

    def matches(self, value: str) -> bool:
        """A1111 clients send the title ("name [hash]"), the name, or a file name with its suffix."""
        if value in (self.title, self.name, self.engine_dir.name):
            return True
        bare = _HASH_SUFFIX.sub("", value.strip())
        for suffix in _CHECKPOINT_SUFFIXES:
            bare = bare.removesuffix(suffix)
        return bare in (self.name, self.engine_dir.name)


def source_name(manifest: Manifest, engine_dir: Path) -> str:
    """The A1111 model name of a folder: its source checkpoint's stem, preset, or folder name."""
    source = manifest.source or {}
    return PurePath(source["path"]).stem if source.get("path") else source.get("preset") or engine_dir.name


def describe(engine_dir: str | Path, manifest: Manifest | None = None, limits: Limits | None = None,
             name: str | None = None) -> Model:
    engine_dir = Path(engine_dir)
    manifest = manifest if manifest is not None else load_manifest(engine_dir)
    if limits is None:
        limits = Limits.from_manifest(manifest, sch.default_sampler(manifest.scheduler), sch.SAMPLERS)
    return Model(engine_dir, manifest, name or source_name(manifest, engine_dir), limits,
                 lora_tags.folder_loras(manifest.source or {}))


def _unique_names(models: list[Model]) -> list[Model]:
    """Folders that share a source name (a base and its LoRA builds) are named by folder instead."""
    names = Counter(m.name for m in models)
    out = [replace(m, name=m.engine_dir.name) if names[m.name] > 1 else m for m in models]
    twice = sorted({m.name for m in out if [x.name for x in out].count(m.name) > 1})
    if twice:
        raise ValueError(f"two served folders are both named {twice[0]!r}; give them different folder names")
    return out


class Models:
    """The served folders, the default one, and the open pipelines (at most `max_resident`).
    `opener(model)` opens a folder (runtime.load with the server's backend and options)."""

    def __init__(self, models: Sequence[Model], opener: Callable[[Model], Pipeline], *,
                 max_resident: int = DEFAULT_MAX_RESIDENT, open_now: dict[int, Pipeline] | None = None,
                 owned: bool = True):
        if not models:
            raise ValueError("serve needs at least one engine folder")
        if max_resident < 1:
            raise ValueError(f"--max-resident must be at least 1; got {max_resident}")
        self.models = _unique_names(list(models))
        self.max_resident = max_resident
        self._opener = opener
        self._owned = owned  # False: the pipelines handed in are the caller's to close
        self._default = self.models[0]
        self._cond = threading.Condition()
        self._open: OrderedDict[int, Pipeline | None] = OrderedDict()  # id(model) -> pipe (None: opening)
        self._users: Counter[int] = Counter()
        self.opened: Counter[str] = Counter()  # title -> times opened (metrics, tests)
        for i, pipe in (open_now or {}).items():
            self._open[id(self.models[i])] = pipe
            self.opened[self.models[i].title] += 1

    @classmethod
    def single(cls, pipe: Pipeline, *, owned: bool = True) -> "Models":
        """One folder, already open (the Python API's `Service(pipe)`)."""
        model = describe(pipe.engine_dir, pipe.manifest, pipe.limits)
        return cls([model], lambda m: pipe, max_resident=1, open_now={0: pipe}, owned=owned)

    @classmethod
    def from_folders(cls, folders: Sequence[str | Path], opener: Callable[[Path], Pipeline], *,
                     max_resident: int = DEFAULT_MAX_RESIDENT) -> "Models":
        """Every folder's manifest read now (a bad folder fails here); the first folder, the
        default, is opened now."""
        models = cls([describe(f) for f in folders], lambda m: opener(m.engine_dir), max_resident=max_resident)
        models.acquire(models.default, timeout=0.0)
        models.release(models.default)
        return models

    # -- names ---------------------------------------------------------------------------------

    @property
    def default(self) -> Model:
        return self._default

    def set_default(self, value: str) -> Model:
        self._default = self.find(value)
        return self._default

    def find(self, value: str | None) -> Model:
        """The model `value` names (None: the default); UnknownModel lists the served titles."""
        if value is None or value == "":
            return self._default
        for m in self.models:
            if m.matches(str(value)):
                return m
        served = ", ".join(repr(m.title) for m in self.models)
        raise UnknownModel(f"model {value!r} is not served here; this server serves {served}")

    def route(self, selected: Model, tagged: lora_tags.TaggedPrompts) -> Model:
        """The folder that honours the prompts' LoRA tags: `selected` if it does, else a served
        folder that does (same source first, then fewest other LoRAs); PipelineError otherwise."""
        if not lora_tags.missing(tagged.tags, selected.loras):
            return selected
        fits = [m for m in self.models if not lora_tags.missing(tagged.tags, m.loras)]
        if fits:
            return min(fits, key=lambda m: (m.base != selected.base, len(m.loras) - len(tagged.tags)))
        offers = "; ".join(f"{m.title}: {lora_tags.describe_offer(m.loras)}" for m in self.models)
        bad = lora_tags.missing(tagged.tags, {})
        wanted = " ".join(t.text for t in bad)
        raise PipelineError(f"LoRA tag(s) {wanted}: no served folder was built with "
                            f"{'that LoRA at that weight' if len(bad) == 1 else 'those LoRAs at those weights'} "
                            f"(LoRAs are fused at build time: build-engine --lora FILE:WEIGHT); served: {offers}",
                            field="prompt")

    # -- open pipelines ------------------------------------------------------------------------

    def resident(self) -> list[str]:
        """Titles of the open folders, least recently used first."""
        titles = {id(m): m.title for m in self.models}
        with self._cond:
            return [titles[k] for k, pipe in self._open.items() if pipe is not None]

    def pipe_if_open(self, model: Model) -> Pipeline | None:
        with self._cond:
            return self._open.get(id(model))

    def acquire(self, model: Model, timeout: float) -> Pipeline:  # long: one wait loop: use, open, or evict
        """The open pipeline of `model`, opening it (and closing the least recently used idle folder
        first when `max_resident` are open). Hand it back with `release(model)`."""
        key, deadline = id(model), time.monotonic() + timeout
        while True:
            victim = None
            with self._cond:
                if key in self._open and self._open[key] is not None:
                    self._open.move_to_end(key)
                    self._users[key] += 1
                    return self._open[key]
                if key not in self._open:
                    if len(self._open) < self.max_resident:
                        self._open[key] = None  # reserved: counts as resident while it opens
                        self._users[key] += 1
                        break
                    victim = next((k for k, p in self._open.items() if p is not None and self._users[k] == 0), None)
                if victim is not None:
                    pipe = self._open.pop(victim)
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ModelBusy(f"{model.title} cannot open now: {len(self._open)} folders are open "
                                        f"(--max-resident {self.max_resident}) and in use; retry shortly")
                    self._cond.wait(left)
                    continue
            self._close(victim, pipe)
        return self._open_reserved(model)

    def _open_reserved(self, model: Model) -> Pipeline:
        key = id(model)
        try:
            log.info("opening %s (%s)", model.title, model.engine_dir)
            pipe = self._opener(model)
        except BaseException:
            with self._cond:
                del self._open[key]
                self._users[key] -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._open[key] = pipe
            self.opened[model.title] += 1
            self._cond.notify_all()
        return pipe

    def _close(self, key: int, pipe: Pipeline) -> None:
        title = next(m.title for m in self.models if id(m) == key)
        log.info("closing %s (least recently used; --max-resident %d)", title, self.max_resident)
        if self._owned:
            pipe.close()
        with self._cond:
            self._cond.notify_all()

    def release(self, model: Model) -> None:
        with self._cond:
            self._users[id(model)] -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """Close every open folder (the server's shutdown). Idempotent."""
        with self._cond:
            pipes = [p for p in self._open.values() if p is not None]
            self._open.clear()
        if self._owned:
            for p in pipes:
                p.close()

"""Prompt styles: AUTOMATIC1111's `styles.csv` (v1.10 modules/styles.py), named prompt and negative
prompt snippets that a request applies by name.

    book = StyleBook.load("styles.csv")
    prompt, negative = book.apply("a fox", "", ["watercolor", "sharp"])

The file (A1111 `StyleDatabase.load_from_csv`): a CSV with a header naming the columns `name`,
`prompt` (or the older `text`) and `negative_prompt` (optional), read as UTF-8 with an optional BOM and
with spaces after the delimiters skipped; rows without a name or whose name starts with "#" are
skipped; a later row of the same name replaces an earlier one.

Applying (A1111 `merge_prompts`, `apply_styles_to_prompt`, called by processing.py `setup_prompts` on
the prompt and the negative prompt alike): the styles in the order named, each in turn: a style text
holding "{prompt}" has every "{prompt}" replaced by the text so far; any other is appended to it
with ", " (both stripped, an empty one left out). A1111 skips a name it does not know; we refuse it
(PipelineError, field "styles"), since the image would silently lack what the style adds.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import PipelineError

__all__ = ["PromptStyle", "StyleBook", "apply_styles", "merge_prompts"]

PROMPT_PLACEHOLDER = "{prompt}"  # A1111 modules/styles.py merge_prompts


@dataclass(frozen=True)
class PromptStyle:
    """One row of styles.csv (A1111's PromptStyle; its API's PromptStyleItem)."""

    name: str
    prompt: str
    negative_prompt: str

    def item(self) -> dict[str, str]:
        """A1111's PromptStyleItem (GET /sdapi/v1/prompt-styles)."""
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """One style applied to a prompt (A1111 modules/styles.py `merge_prompts`)."""
    if PROMPT_PLACEHOLDER in style_prompt:
        return style_prompt.replace(PROMPT_PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, style_prompts: Iterable[str]) -> str:
    """Style texts applied in order (A1111 `apply_styles_to_prompt`)."""
    for style_prompt in style_prompts:
        prompt = merge_prompts(style_prompt, prompt)
    return prompt


@dataclass(frozen=True)
class StyleBook:
    """The styles of one styles.csv, by name, in the file's order."""

    styles: Mapping[str, PromptStyle]
    path: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "StyleBook":
        """Read a styles.csv (module doc); ValueError naming the file if it cannot be read or has no
        `name` and `prompt` (or `text`) columns."""
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, skipinitialspace=True)
                columns = set(reader.fieldnames or ())
                if "name" not in columns or not columns & {"prompt", "text"}:
                    raise ValueError(f"styles file {path}: the header must name the columns name, prompt and "
                                     f"(optionally) negative_prompt, as A1111's styles.csv; got {sorted(columns)}")
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"styles file {path}: cannot be read: {e}") from e
        styles: dict[str, PromptStyle] = {}
        for row in rows:
            name = row.get("name") or ""
            if not name or name.startswith("#"):  # A1111: empty rows and comments are skipped
                continue
            prompt = row.get("prompt") if "prompt" in columns else row.get("text")
            styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")
        return cls(styles, str(path))

    def apply(self, prompt: str, negative_prompt: str, names: Iterable[str]) -> tuple[str, str]:
        """(prompt, negative prompt) with the named styles applied; PipelineError (field "styles")
        naming an unknown style and the known ones."""
        names = list(names)
        unknown = [n for n in names if n not in self.styles]
        if unknown:
            known = ", ".join(repr(n) for n in self.styles) or "none"
            raise PipelineError(f"unknown style(s) {', '.join(repr(n) for n in unknown)}; the styles file "
                                f"{self.path} has: {known}", field="styles")
        chosen = [self.styles[n] for n in names]
        return (apply_styles(prompt, (s.prompt for s in chosen)),
                apply_styles(negative_prompt, (s.negative_prompt for s in chosen)))

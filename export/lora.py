"""LoRA files merged into the reference weights before export, so every engine (TensorRT included)
runs the merged weights with no graph change:

    W' = W + scale * factor * up @ down        (convs: up [out, r, 1, 1] @ down [r, in, kh, kw], reshaped)

`factor` is alpha / rank (Hu et al. 2021, arXiv:2106.09685, sec. 4.1), and `scale` the user's
multiplier (`--lora FILE:SCALE`, diffusers' `fuse_lora(lora_scale=...)`). Only `.safetensors` files
are read: a pickle can run code when loaded, so it is refused.

Layouts, for the U-Net and the text encoder of SD 1.x and 2.x, and SDXL's second text encoder
(`text_encoder_2.` in diffusers / PEFT files, `lora_te2_` in kohya's; `lora_te1_` is its first, which
the SDXL refiner lacks: its U-Net and text_encoder_2 take a LoRA, as diffusers' refiner pipeline
loads one) and
kohya's SDXL U-Net names, which follow the original (LDM) layout (`lora_unet_input_blocks_4_1_...`,
resolved through export/convert_ldm.py's U-Net rules):
- kohya / A1111 (kohya-ss/sd-scripts `networks/lora.py`): `lora_unet_<module>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; the text encoder under `lora_te_` (or `lora_te1_`). <module> is the
  module's dotted name with every "." replaced by "_", which is ambiguous, so it is resolved against
  the model's own modules: each Linear / Conv2d's dotted name, spelled with underscores. Linear layers,
  1x1 convs and LoCon 3x3 convs (3x3 down, 1x1 up).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.` likewise), and
  the older diffusers spellings `.lora.down/up.weight`, `.lora_linear_layer.down/up.weight` and the
  attention-processor form `<attention>.processor.to_q_lora.down.weight` (`to_out_lora` = `to_out.0`;
  in the text encoder `to_q_lora` = `q_proj`, `to_out_lora` = `out_proj`).

Alpha, as the tools that write each layout read it back:
- kohya: the module's `.alpha`; absent or 0 means alpha = rank, factor 1 (sd-scripts `LoRAModule`:
  "if alpha == 0 or None, alpha is rank"; A1111 `network.py` `calc_scale` also gives 1.0 without
  alpha). diffusers' `load_lora_weights` agrees when a file's alphas are one value, as kohya writes
  them for all linear layers (`--network_alpha`); its kohya->PEFT conversion names the attention
  projections' alphas so that they match no module, so with per-module alphas it gives them the most
  common alpha instead (diffusers 0.42 `get_peft_kwargs`). We follow the file.
- diffusers / PEFT: the `lora_adapter_metadata` entry of the safetensors header, the `LoraConfig`
  that `save_lora_weights(..., unet_lora_adapter_metadata=...)` stores per component: `lora_alpha`,
  `alpha_pattern` (regex per module, matched as PEFT's `get_pattern_key` does), `use_rslora` (factor
  alpha / sqrt(rank), Kalajdzievski 2023, arXiv:2312.03732). Without metadata alpha = rank, factor 1
  (diffusers `get_peft_kwargs`: "W_eff = W + lora_B @ lora_A"). A `.alpha` key next to lora_A/B is
  read as in kohya files (diffusers refuses such files).

Refused with the keys named: keys of no known layout (DoRA, LoHa, LoKr, biases included), modules
this model lacks (a second text encoder's keys, kohya's LDM block names for the U-Net, both SDXL's,
for SD 1.x/2.x), down without up; shapes that do not fit (a LoRA for another family: SD 2.x's text width is 1024, SD 1.x's 768).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from export import convert_ldm
from export.convert_ldm import CheckpointError
from export.hashing import file_sha256

__all__ = ["LoraError", "LoraLayer", "LoraSpec", "apply_loras", "layer_names", "lora_delta", "lora_record",
           "lora_specs", "merge_layers", "parse_lora", "read_lora"]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_NETWORK_NAMES = {"unet": "U-Net", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers loaders/lora_base.py LORA_ADAPTER_METADATA_KEY
_SHOWN = 5  # keys named in an error message before "... (N more)"

_KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora_A\.weight|lora_B\.weight|"
                            r"lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight|"
                            r"lora_linear_layer\.up\.weight|alpha)$")
_ATTN_PROC_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
         "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
         "lora_linear_layer.up.weight": "up", "alpha": "alpha", "down": "down", "up": "up"}
_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2",
              "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
_ATTN_PROC_MODULE = {"unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
                     "text_encoder": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}
_LDM_BLOCKS = ("input_blocks", "middle_block", "output_blocks", "label_emb")  # kohya's SDXL U-Net names
_OTHER_KINDS = (("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), ("hada_", "LoHa"), ("lokr_", "LoKr"),
                ("lora_B.bias", "LoRA bias"), (".diff", "full-weight difference"))


class LoraError(CheckpointError):
    """A LoRA file that cannot be merged into this model (format, keys, family, shapes)."""


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora FILE[:SCALE]` argument."""

    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: network ("unet" | "text_encoder"), the module's dotted name there, the
    factors as stored (down [r, in] or [r, in, kh, kw]; up [out, r] or [out, r, 1, 1]) and alpha / rank."""

    component: str
    module: str
    down: torch.Tensor
    up: torch.Tensor
    factor: float


# ----------------------------------------------------------------------------------- arguments


def _parse_arg(arg: str) -> LoraSpec:
    """"FILE[:SCALE]": the text after the last ':' is a scale when it reads as a number and the
    whole argument is not itself an existing file."""
    path, sep, tail = arg.rpartition(":")
    if sep and not Path(arg).is_file():
        try:
            return LoraSpec(Path(path), float(tail))
        except ValueError:
            pass
    return LoraSpec(Path(arg))


def lora_specs(loras: Iterable[str | os.PathLike | tuple[str | os.PathLike, float] | LoraSpec]) -> tuple[LoraSpec, ...]:
    """Normalize `build_engine(loras=...)`: "FILE[:SCALE]" strings, paths (scale 1), (path, scale)
    pairs or `LoraSpec`s. Each file must exist and each scale be finite."""
    out = []
    for item in loras:
        if isinstance(item, LoraSpec):
            spec = item
        elif isinstance(item, tuple):
            spec = LoraSpec(Path(item[0]), float(item[1]))
        elif isinstance(item, str):
            spec = _parse_arg(item)
        else:
            spec = LoraSpec(Path(item))
        spec = LoraSpec(spec.path.expanduser(), spec.scale)
        if not spec.path.is_file():
            raise LoraError(f"LoRA file {spec.path} does not exist (expected FILE.safetensors[:SCALE])")
        if not math.isfinite(spec.scale):
            raise LoraError(f"LoRA {spec.path}: scale must be a finite number, got {spec.scale}")
        _refuse_non_safetensors(spec.path)
        out.append(spec)
    return tuple(out)


def lora_record(spec: LoraSpec) -> dict[str, Any]:
    """What the manifest's `source` records of one LoRA (part of the folder's reuse key)."""
    return {"file": spec.path.name, "path": str(spec.path.resolve()), "sha256": file_sha256(spec.path),
            "scale": spec.scale}


# ---------------------------------------------------------------------------------------- reading


def _refuse_non_safetensors(path: Path) -> None:
    """A .safetensors file starts with its header's length (8 bytes, little-endian) and then the
    JSON header's "{" (safetensors format spec); a pickle never does."""
    with path.open("rb") as f:
        head = f.read(9)
    if path.suffix.lower() != ".safetensors" or len(head) < 9 or head[8:9] != b"{":
        raise LoraError(f"{path}: LoRA files are read as .safetensors only (a pickle, .pt / .ckpt / .bin, can run "
                        "code when loaded); convert it to .safetensors in a trusted environment")


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, diffusers adapter metadata or {}) of a `.safetensors` LoRA. Anything else is refused
    before it is opened as a pickle."""
    path = Path(path)
    _refuse_non_safetensors(path)
    try:
        tensors = safetensors.torch.load_file(str(path))
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (safetensors.SafetensorError, OSError) as e:
        raise LoraError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e
    try:
        metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
    except json.JSONDecodeError as e:
        raise LoraError(f"{path}: unreadable {METADATA_KEY} in the safetensors header: {e}") from e
    return tensors, metadata


def _key_list(keys: Sequence[str]) -> str:
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"{len(keys)} key(s): {', '.join(keys[:_SHOWN])}{more}"


def _classify(key: str) -> tuple[str, str, str, str] | None:
    """(layout, component, locator, role) of a LoRA key, or None for a key of no known layout.
    The locator is the kohya underscore name or the diffusers dotted path, not yet resolved."""
    if m := _KOHYA_KEY.match(key):
        return "kohya", _COMPONENT[m[1]], m[2], _ROLE[m[3]]
    if m := _ATTN_PROC_KEY.match(key):
        path = m[2].removesuffix(".processor")
        return "diffusers", m[1], f"{path}.{_ATTN_PROC_MODULE[m[1]][m[3]]}", m[4]
    if m := _DIFFUSERS_KEY.match(key):
        return "diffusers", _COMPONENT[m[1]], m[2].replace(".processor.", "."), _ROLE[m[3]]
    return None


def _refuse_sdxl(keys: Iterable[tuple[str, str, str]], where: Path, sdxl_model: bool) -> None:
    """An SDXL LoRA (a second text encoder's keys, kohya's LDM block names for the U-Net) for a model
    without a second text encoder is refused."""
    sdxl = sorted(key for key, component, locator in keys
                  if component == "text_encoder_2" or (component == "unet" and locator.startswith(_LDM_BLOCKS))
                  or locator.startswith(("add_embedding", "add_time_proj")))
    if sdxl and not sdxl_model:
        raise LoraError(f"{where}: this is an SDXL LoRA (second text encoder or LDM block names: {_key_list(sdxl)}); "
                        "only SDXL models take it")


def _group(tensors: Mapping[str, torch.Tensor], where: Path,
           sdxl_model: bool = False) -> tuple[str, dict[tuple[str, str, str], dict[str, Any]]]:
    """Group a file's tensors by (layout, component, locator) -> {"down", "up", "alpha"}; returns the layout
    ("kohya", "diffusers" or "mixed"). Unknown keys are an error naming them."""
    unknown, layouts, groups, seen = [], set(), {}, []
    for key, value in tensors.items():
        info = _classify(key)
        if info is None:
            unknown.append(key)
            continue
        layout, component, locator, role = info
        layouts.add(layout)
        seen.append((key, component, locator))
        groups.setdefault((layout, component, locator), {})[role] = (key, value)
    _refuse_sdxl(seen, where, sdxl_model)
    if unknown:
        kinds = sorted({kind for key in unknown for pattern, kind in _OTHER_KINDS if pattern in key})
        hint = f" ({', '.join(kinds)} is not supported: plain LoRA only)" if kinds else ""
        raise LoraError(f"{where}: not LoRA keys of a known layout (kohya lora_unet_/lora_te_ or diffusers "
                        f"unet./text_encoder. with lora_A/lora_B){hint}: {_key_list(sorted(unknown))}")
    if not groups:
        raise LoraError(f"{where}: the file holds no tensors")
    return (layouts.pop() if len(layouts) == 1 else "mixed"), groups


# ------------------------------------------------------------------------------------- resolving


def layer_names(network: nn.Module, component: str) -> tuple[dict[str, str], dict[str, str]]:
    """The names a LoRA key may give each Linear / Conv2d of `network`: (dotted, underscore) maps to
    the module's own dotted name. A text encoder's names are also taken without "text_model." (the
    wrapper transformers 4 had and transformers 5 flattened away)."""
    dotted, underscore = {}, {}
    for name, module in network.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        short = name.removeprefix("text_model.") if component.startswith("text_encoder") else name
        flat = short.replace(".", "_")
        if flat in underscore:
            raise LoraError(f"kohya LoRA names are ambiguous in this {component}: {underscore[flat]!r} and {name!r} "
                            f"are both {flat!r}")
        dotted[short], underscore[flat] = name, name
    if component == "unet":  # kohya's SDXL names: the original (LDM) layout's (export/convert_ldm.py rules)
        ldm = convert_ldm.unet_to_ldm({f"{name}.weight": name for name in dotted.values()})
        underscore.update({key.removesuffix(".weight").replace(".", "_"): name for key, name in ldm.items()
                           if key.startswith(_LDM_BLOCKS + ("time_embed.", "out."))})
    return dotted, underscore


def _resolve(layout: str, component: str, locator: str,
             names: Mapping[str, tuple[dict[str, str], dict[str, str]]]) -> str | None:
    """The module a key's locator names: a kohya underscore name or a diffusers dotted path."""
    if component not in names:
        return None
    dotted, underscore = names[component]
    table, prefix = (underscore, "text_model_") if layout == "kohya" else (dotted, "text_model.")
    return table.get(locator) or table.get(locator.removeprefix(prefix))


def _pattern_value(patterns: Mapping[str, Any], names: Sequence[str]) -> Any:
    """The value of the first pattern that matches one of the module's names, as PEFT's
    `get_pattern_key` matches (`re.match(rf"(.*\\.)?({pattern})$", name)`); None if none does."""
    for pattern, value in patterns.items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            return value
    return None


def _factor(rank: int, alpha: float | None, config: Mapping[str, Any] | None, module: str, component: str) -> float:
    """alpha / rank for one module (module doc: how each layout stores alpha)."""
    if alpha is not None:  # a .alpha key: kohya's rule
        return alpha / rank if alpha else 1.0
    if not config:
        return 1.0
    names = [module, f"text_model.{module}"] if component.startswith("text_encoder") else [module]
    value = _pattern_value(config.get("alpha_pattern") or {}, names)
    alpha = float(value if value is not None else config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _component_configs(metadata: Mapping[str, Any], where: Path) -> dict[str, dict[str, Any]]:
    """{"unet": LoraConfig dict, "text_encoder": ...} from diffusers' flat "<component>.<field>" metadata."""
    configs: dict[str, dict[str, Any]] = {}
    for key, value in metadata.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    dora = [c for c, cfg in configs.items() if cfg.get("use_dora")]
    if dora:
        raise LoraError(f"{where}: a DoRA adapter ({', '.join(dora)}: use_dora in {METADATA_KEY}); plain LoRA only")
    return configs


# ------------------------------------------------------------------------------------------ parsing


def _shape_problem(down: torch.Tensor, up: torch.Tensor, weight_shape: torch.Size) -> str | None:
    """Why up @ down cannot update a weight of `weight_shape` (Linear [out, in], Conv2d [out, in, kh, kw])."""
    rank = down.shape[0]
    if down.ndim != len(weight_shape) or up.ndim != len(weight_shape) or up.shape[1] != rank:
        return "down/up do not form a LoRA of this layer's kind"
    if up.shape[0] != weight_shape[0] or down.shape[1:] != weight_shape[1:]:
        return "shapes differ"
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        return "the up half of a conv LoRA must be 1x1"
    return None


def parse_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
               networks: Mapping[str, nn.Module], where: str | os.PathLike = "LoRA") -> tuple[str, list[LoraLayer]]:
    """(layout, layers) of a LoRA file's tensors against `networks` ({"unet": ..., "text_encoder": ...}).
    Raises `LoraError` naming unknown or unmatched keys, incomplete pairs, and layers whose shapes do
    not fit (a LoRA for another family). Tensors are upcast to float32; nothing is modified."""
    where = Path(where)
    layout, groups = _group(tensors, where, "text_encoder_2" in networks)
    configs = _component_configs(metadata, where)
    names = {c: layer_names(networks[c], c) for c in COMPONENTS if c in networks}
    weights = {c: dict(networks[c].named_parameters()) for c in names}
    unmatched, incomplete, misfit, layers = [], [], [], []
    for (layout_of_key, component, locator), parts in groups.items():
        keys = sorted(key for key, _ in parts.values())
        module = _resolve(layout_of_key, component, locator, names)
        if module is None:
            unmatched += keys
            continue
        if "down" not in parts or "up" not in parts:
            incomplete += keys
            continue
        down, up = parts["down"][1].float(), parts["up"][1].float()
        weight = weights[component][f"{module}.weight"]
        problem = _shape_problem(down, up, weight.shape)
        if problem:
            misfit.append(f"{component}.{module}: down {tuple(down.shape)}, up {tuple(up.shape)}, "
                          f"weight {tuple(weight.shape)} ({problem})")
            continue
        alpha = float(parts["alpha"][1]) if "alpha" in parts else None
        factor = _factor(down.shape[0], alpha, configs.get(component), module, component)
        layers.append(LoraLayer(component, module, down, up, factor))
    _raise_problems(where, unmatched, incomplete, misfit, networks)
    return layout, sorted(layers, key=lambda layer: (layer.component, layer.module))


def _raise_problems(where: Path, unmatched: list[str], incomplete: list[str], misfit: list[str],
                    networks: Mapping[str, nn.Module]) -> None:
    parts = []
    if misfit:
        parts.append(f"{len(misfit)} layer(s) have shapes that do not fit this model, so the LoRA was made for "
                     f"another model family (SD 1.x text width 768, SD 2.x 1024, SDXL 768 + 1280): {'; '.join(misfit[:_SHOWN])}"
                     + (f"; ... ({len(misfit) - _SHOWN} more)" if len(misfit) > _SHOWN else ""))
    if unmatched:
        where_to = " or ".join(_NETWORK_NAMES[c] for c in COMPONENTS if c in networks)
        parts.append(f"{_key_list(sorted(unmatched))} match no layer of this model's {where_to}")
    if incomplete:
        parts.append(f"{_key_list(sorted(incomplete))} lack their down or up half")
    if parts:
        raise LoraError(f"{where}: " + "; ".join(parts))


# -------------------------------------------------------------------------------------------- merging


def lora_delta(layer: LoraLayer, weight_shape: Sequence[int]) -> torch.Tensor:
    """factor * up @ down in the weight's shape, float32 (convs: [out, r] @ [r, in * kh * kw])."""
    up = layer.up.reshape(layer.up.shape[0], -1)
    down = layer.down.reshape(layer.down.shape[0], -1)
    return (layer.factor * (up @ down)).reshape(tuple(weight_shape))


def merge_layers(networks: Mapping[str, nn.Module], layers: Iterable[LoraLayer], scale: float) -> int:
    """Add scale * delta to each layer's weight, in place (the build owns the freshly loaded model;
    a copy of a full-size U-Net would double peak memory). Returns the number of layers merged."""
    count = 0
    with torch.no_grad():
        for layer in layers:
            weight = networks[layer.component].get_submodule(layer.module).weight
            weight.add_((scale * lora_delta(layer, weight.shape)).to(weight.dtype))
            count += 1
    return count


def apply_loras(model: Any, specs: Sequence[LoraSpec], progress: Any = None) -> Any:
    """Merge each LoRA of `specs` into `model` (an export.loading.read.LoadedModel), in order; every file
    is parsed and checked before any weight changes. Returns the model (its weights updated in place)."""
    # SDXL adds text_encoder_2; its refiner has no text_encoder
    networks = {c: getattr(model, c) for c in COMPONENTS if getattr(model, c, None) is not None}
    parsed = []
    for spec in specs:
        tensors, metadata = read_lora(spec.path)
        parsed.append((spec, *parse_lora(tensors, metadata, networks, spec.path)))
    for spec, layout, layers in parsed:
        n = merge_layers(networks, layers, spec.scale)
        if progress is not None:
            counts = ", ".join(f"{_NETWORK_NAMES[c]} {sum(layer.component == c for layer in layers)}"
                               for c in networks)
            progress(f"  merged LoRA {spec.path.name} ({layout} layout, scale {spec.scale:g}): {n} layers ({counts})")
    return model

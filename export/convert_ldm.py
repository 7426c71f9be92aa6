"""Rule-based key renaming between the original single-file layout and ours (= diffusers 0.42).

The original layout is the one the CompVis / Stability `ldm` code writes (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*`): modules `ldm/modules/diffusionmodules/openaimodel.py`
(UNetModel), `ldm/modules/diffusionmodules/model.py` (Encoder / Decoder) and
`ldm/modules/encoders/modules.py` (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder) of
github.com/Stability-AI/stablediffusion. tests/test_loading.py checks these rules against diffusers
0.42's own converter (`diffusers/loaders/single_file_utils.py`) as an independent reference.

Every mapping is a list of `(ours_prefix, ldm_prefix, inner)` rules: the prefix is swapped and the
`inner` pairs rename dotted segments of the rest of the key. The rules are generated from the block
structure (block count, resnets per block, which blocks attend), which is itself read off the keys,
so no config is needed and both directions use the same rules. Keys that no rule matches pass
through unchanged, so a strict `load_state_dict` afterwards reports them by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: Hugging Face CLIP keys
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP keys

Rule = tuple[str, str, tuple[tuple[str, str], ...]]
StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the problem."""


# LDM ResBlock -> diffusers ResnetBlock2D (U-Net).
_UNET_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)
# LDM ResnetBlock -> ResnetBlock2D (VAE); norm1/conv1/norm2/conv2 already agree.
_VAE_RESNET = (("nin_shortcut", "conv_shortcut"),)
# LDM AttnBlock (1x1 convs) -> diffusers Attention (linears).
_VAE_ATTN = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
# OpenCLIP ResidualAttentionBlock -> CLIPEncoderLayer (q/k/v split handled separately).
_OPENCLIP_LAYER = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
)


def _rename_inner(rest: str, inner: tuple[tuple[str, str], ...], to_ldm: bool) -> str:
    dotted = "." + rest
    for ldm, ours in inner:
        src, dst = (ours, ldm) if to_ldm else (ldm, ours)
        if f".{src}." in dotted:
            dotted = dotted.replace(f".{src}.", f".{dst}.", 1)
            break
    return dotted[1:]


def _apply_rules(state_dict: StateDict, rules: list[Rule], to_ldm: bool) -> StateDict:
    out = {}
    for key, value in state_dict.items():
        new_key = key
        for ours, ldm, inner in rules:
            src, dst = (ours, ldm) if to_ldm else (ldm, ours)
            if key.startswith(src):
                new_key = dst + _rename_inner(key[len(src):], inner, to_ldm)
                break
        out[new_key] = value
    return out


def block_indices(keys, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) at the start of keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


# --------------------------------------------------------------------------------------------- U-Net


@dataclass(frozen=True)
class UNetLayout:
    """Block structure of an SD U-Net: resnets per down block and which blocks have attention."""

    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]


def unet_layout_from_ours(keys) -> UNetLayout:
    keys = list(keys)
    blocks = block_indices(keys, r"down_blocks\.(\d+)\.")
    layers = block_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    if not blocks or not layers:
        raise CheckpointError("U-Net state dict has no down_blocks.N.resnets.M keys")
    down = tuple(any(k.startswith(f"down_blocks.{b}.attentions.") for k in keys) for b in blocks)
    up = tuple(any(k.startswith(f"up_blocks.{b}.attentions.") for k in keys) for b in blocks)
    return UNetLayout(len(layers), down, up)


def unet_layout_from_ldm(keys) -> UNetLayout:
    """Layout from unprefixed LDM keys: input_blocks 1.. hold `layers_per_block` resnets then one
    downsampler (`.0.op`) per block, except the last block, which has no downsampler."""
    keys = list(keys)
    inputs = block_indices(keys, r"input_blocks\.(\d+)\.")
    n_blocks = len(block_indices(keys, r"input_blocks\.(\d+)\.0\.op\.")) + 1
    if not inputs or len(inputs) % n_blocks:
        raise CheckpointError(
            f"U-Net input_blocks do not form a Stable Diffusion U-Net: {len(inputs)} input blocks "
            f"for {n_blocks} resolution levels"
        )
    per_block = len(inputs) // n_blocks  # layers_per_block + 1 (the first level counts conv_in)
    down = tuple(
        any(k.startswith(f"input_blocks.{1 + b * per_block}.1.") for k in keys) for b in range(n_blocks)
    )
    up = tuple(
        any(k.startswith(f"output_blocks.{b * per_block}.1.proj_in.") for k in keys) for b in range(n_blocks)
    )
    return UNetLayout(per_block - 1, down, up)


def _unet_rules(layout: UNetLayout) -> list[Rule]:
    n, per = len(layout.down_attention), layout.layers_per_block + 1
    rules: list[Rule] = [
        ("time_embedding.linear_1.", "time_embed.0.", ()),
        ("time_embedding.linear_2.", "time_embed.2.", ()),
        ("conv_in.", "input_blocks.0.0.", ()),
        ("conv_norm_out.", "out.0.", ()),
        ("conv_out.", "out.2.", ()),
        # SDXL's add_embedding (sgm openaimodel.py UNetModel.label_emb: Linear, SiLU, Linear)
        ("add_embedding.linear_1.", "label_emb.0.0.", ()),
        ("add_embedding.linear_2.", "label_emb.0.2.", ()),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", ()),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for b in range(n):
        for j in range(layout.layers_per_block):
            i = 1 + b * per + j
            rules.append((f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0.", _UNET_RESNET))
            if layout.down_attention[b]:
                rules.append((f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.", ()))
        if b < n - 1:
            rules.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{b * per + per}.0.op.", ()))
        # Up blocks have one resnet more (it takes the skip from the downsampler / conv_in).
        for j in range(per):
            i = b * per + j
            rules.append((f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0.", _UNET_RESNET))
            if layout.up_attention[b]:
                rules.append((f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.", ()))
        if b < n - 1:
            slot = 2 if layout.up_attention[b] else 1
            rules.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{b * per + per - 1}.{slot}.conv.", ()))
    return rules


def unet_to_ldm(state_dict: StateDict) -> StateDict:
    """Our U-Net keys -> LDM keys (without the `model.diffusion_model.` prefix)."""
    return _apply_rules(state_dict, _unet_rules(unet_layout_from_ours(state_dict)), to_ldm=True)


def unet_from_ldm(state_dict: StateDict) -> StateDict:
    """LDM U-Net keys (prefix already stripped) -> ours."""
    return _apply_rules(state_dict, _unet_rules(unet_layout_from_ldm(state_dict)), to_ldm=False)


# ----------------------------------------------------------------------------------------------- VAE


def _vae_rules(n_blocks: int) -> list[Rule]:
    rules: list[Rule] = []
    for side in ("encoder", "decoder"):
        rules += [
            (f"{side}.conv_norm_out.", f"{side}.norm_out.", ()),
            (f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", _VAE_RESNET),
            (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", _VAE_RESNET),
            (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTN),
        ]
    for i in range(n_blocks):
        rules += [
            (f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", _VAE_RESNET),
            (f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", ()),
            # The LDM decoder numbers its levels from the lowest resolution up: reversed.
            (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n_blocks - 1 - i}.block.", _VAE_RESNET),
            (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n_blocks - 1 - i}.upsample.conv.", ()),
        ]
    return rules


def _is_vae_attn_weight(ours_key: str) -> bool:
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", ours_key))


def vae_to_ldm(state_dict: StateDict) -> StateDict:
    """Our VAE keys -> LDM keys (without `first_stage_model.`); attention linears become 1x1 convs."""
    n_blocks = len(block_indices(state_dict, r"encoder\.down_blocks\.(\d+)\."))
    shaped = {k: v[:, :, None, None] if _is_vae_attn_weight(k) else v for k, v in state_dict.items()}
    return _apply_rules(shaped, _vae_rules(n_blocks), to_ldm=True)


def vae_from_ldm(state_dict: StateDict) -> StateDict:
    """LDM VAE keys (prefix stripped) -> ours; 1x1 conv attention weights [out, in, 1, 1] -> [out, in]."""
    n_blocks = len(block_indices(state_dict, r"encoder\.down\.(\d+)\."))
    out = _apply_rules(state_dict, _vae_rules(n_blocks), to_ldm=False)
    return {k: v.reshape(v.shape[:2]) if _is_vae_attn_weight(k) and v.ndim > 2 and v.shape[2:].numel() == 1 else v
            for k, v in out.items()}


# ------------------------------------------------------------------------------------- text encoders

# transformers 5 `CLIPTextModel` keys have no `text_model.` prefix; files written by transformers 4
# and every SD 1.x single file have it. Ours is the unprefixed form; files get the prefixed one.
HF_TEXT_PREFIX = "text_model."


def clip_from_file(state_dict: StateDict) -> StateDict:
    """Hugging Face CLIP text keys as stored in files -> our `CLIPTextModel` keys."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix(HF_TEXT_PREFIX)
        if key != "embeddings.position_ids":  # a non-persistent buffer that old files carry
            out[key] = value
    return out


def clip_to_file(state_dict: StateDict) -> StateDict:
    return {HF_TEXT_PREFIX + k: v for k, v in state_dict.items()}


_OPENCLIP_TOP = (
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.weight", "ln_final.weight"),
    ("final_layer_norm.bias", "ln_final.bias"),
)
# Keys of the full OpenCLIP text tower that SD 2.x does not use (it reads the penultimate layer).
_OPENCLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")


def openclip_from_ldm(state_dict: StateDict, keep_last: bool = False) -> StateDict:
    """OpenCLIP text keys (prefix `cond_stage_model.model.` stripped) -> our `CLIPTextModel` keys.

    SD 2.x conditions on the penultimate layer (then `ln_final`), so the last resblock is dropped:
    the 24-block OpenCLIP ViT-H text tower becomes a 23-layer `CLIPTextModel`, as in diffusers.
    `keep_last` keeps every block (SDXL's ViT-bigG: `openclip_g_from_ldm`).
    """
    top = {ldm: ours for ours, ldm in _OPENCLIP_TOP}
    blocks = block_indices(state_dict, r"transformer\.resblocks\.(\d+)\.")
    last = blocks[-1] if blocks and not keep_last else -1
    layer = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
    out = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
        elif key in _OPENCLIP_UNUSED:
            continue
        elif m := layer.match(key):
            index, rest = int(m.group(1)), m.group(2)
            if index == last:
                continue
            prefix = f"encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # "weight" / "bias"
                for name, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = chunk.clone()
            else:
                out[prefix + _rename_inner(rest, _OPENCLIP_LAYER, to_ldm=False)] = value
        else:
            out[key] = value  # unknown: left for the strict load to report
    return out


# SDXL single files (Stability-AI/generative-models, sgm/modules/encoders/modules.py GeneralConditioner):
# embedders.0 is FrozenCLIPEmbedder (Hugging Face CLIP keys), embedders.1 FrozenOpenCLIPEmbedder2 (OpenCLIP keys)
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."


def openclip_g_from_ldm(state_dict: StateDict) -> StateDict:
    """SDXL's OpenCLIP ViT-bigG text keys (prefix `conditioner.embedders.1.model.` stripped) -> our
    `CLIPTextModelWithProjection` keys (`text_model.*`, `text_projection.weight`): every block kept
    (SDXL reads the penultimate layer and the pooled output of the last), in_proj split into q/k/v,
    and `text_projection` ([width, projection], applied as x @ P) transposed into the Linear weight
    [projection, width], as diffusers' convert_open_clip_checkpoint does."""
    rest = {k: v for k, v in state_dict.items() if k != "text_projection"}
    out = {f"text_model.{k}": v for k, v in openclip_from_ldm(rest, keep_last=True).items()}
    if "text_projection" in state_dict:
        out["text_projection.weight"] = state_dict["text_projection"].T.contiguous()
    return out


def openclip_to_ldm(state_dict: StateDict) -> StateDict:
    """Our SD 2.x `CLIPTextModel` keys -> OpenCLIP keys (without `cond_stage_model.model.`).

    The OpenCLIP tower has one block more than we use; the file gets a copy of our last layer in
    that slot so it keeps the block count SD 2.x tools expect. It never affects outputs: loading
    drops it again.
    """
    top = dict(_OPENCLIP_TOP)
    layer = re.compile(r"encoder\.layers\.(\d+)\.(.+)$")
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
        elif m := layer.match(key):
            index, rest = int(m.group(1)), m.group(2)
            if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((index, q.group(2)), {})[q.group(1)] = value
            else:
                out[f"transformer.resblocks.{index}." + _rename_inner(rest, _OPENCLIP_LAYER, to_ldm=True)] = value
        else:
            out[key] = value
    for (index, kind), parts in qkv.items():
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    blocks = block_indices(out, r"transformer\.resblocks\.(\d+)\.")
    if blocks:
        last = f"transformer.resblocks.{blocks[-1]}."
        extra = f"transformer.resblocks.{blocks[-1] + 1}."
        out.update({extra + k[len(last):]: v.clone() for k, v in list(out.items()) if k.startswith(last)})
    return out

"""ONNX export of the networks, with a parity check against PyTorch.

`export_network(network, model, out_dir, ...)` exports one network: its signature wrapper (`wrap`:
one small `nn.Module` per network) fixes the signature
declared in `runtime/folder/networks.py` (names, dtypes, symbolic axes), exports it with the TorchScript
exporter of `torch.onnx` (`dynamo=False`: it exports these graphs in about a second with every
symbolic axis dynamic, where the dynamo exporter takes ten times longer and renames output axes),
checks the graph with `onnx.checker` and shape inference, then runs it in ONNX Runtime at two
shapes and compares with the PyTorch fp32 reference. An error over `PARITY_THRESHOLDS` raises
`ParityError`; on any failure nothing is left at the destination.

fp16 graphs are exported from a float16 copy of the module (float16 I/O), so the operations the
reference itself keeps in float32 (diffusers-style `.float()` upcasts, e.g. the sinusoidal
timestep embedding and `upcast_attention`) stay in float32 in the graph, and so do the GroupNorm
and LayerNorm computations (export/fp16.py): the graphs are strongly typed as TensorRT runs them.
Measured against the fp32 reference (relative error; full-size figures from before the
normalizations were kept in float32): tiny presets at most 2.3e-3; full-size SD 1.5 (random weights,
256 px) 1.0e-3 text encoder, 8.9e-4 U-Net, 9.6e-4 VAE decoder, 1.3e-3 VAE encoder. fp32 graphs:
1e-6 to 5e-6 (tiny and full size).

The VAE decoder's upsamplers are exported as one stride-2 transposed convolution each
(`TRANSPOSED_UPSAMPLE_NETWORKS`, export/upsample.py): the same values with 16 multiply-adds per input
pixel where nearest x2 + 3x3 conv takes 36. The parity check compares that graph with the unchanged
reference.

Step cache (DeepCache, arXiv:2312.00858): `unet_deep` and `unet_shallow` (runtime/folder/networks.py) wrap
the reference U-Net's `forward_deep` / `forward_shallow` for one cache branch; `export_step_cache`
exports both beside `unet`, checks each against the PyTorch split, points the three U-Net graphs
at one weights file (export/external_data.py) and checks them against each other on the final files.
"""

from __future__ import annotations

import copy
import gc
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.circular import circular_padding
from export.external_data import attach_weights, share_weights
from export.fp16 import reduced_precision
from export.tiny_vae import AutoencoderTiny
from export.unet import cache_split
from export.upsample import transposed_upsamplers
from runtime.compare import max_errors, rel_err
from runtime.folder.networks import (
    CONTROL_UNET,
    CONTROLNET,
    GUIDED_NETWORKS,
    NETWORKS,
    OPTIONAL_NETWORKS,
    STEP_CACHE_NETWORKS,
    TILING_NETWORKS,
    TINY_VAE_NETWORKS,
    UNET_NETWORKS,
    ModelDims,
    TensorSpec,
    axis_values,
    base_network,
    concrete_shape,
    controlnet_name,
    network_io,
)

OPSET = 17
# Relative error max|ort - torch| / max|torch| allowed per precision of the graph's weights.
PARITY_THRESHOLDS = {"fp32": 1e-4, "fp16": 1e-2}
# The KL VAE graphs' own fp32 bound. Measured on the full-size SDXL VAE (random weights) at its
# default 1024 px parity shapes: the decoder differs by 1.7e-4 (max abs 4.9e-4 on outputs up to 2.9;
# 2.2e-5 at 512), the encoder by 1.2e-4 (at 1024 x 1032, batch 2): 30-odd convolutions over a
# 128 x 128 latent, a 16384-token attention and the decoder's transposed upsamplers (above) summing
# in other orders. 5e-4 of the output's range is an eighth of one 8-bit level of a decoded image, and
# a wrong operator is off by orders of magnitude more.
VAE_PARITY_THRESHOLDS = {(name, "fp32"): 5e-4 for name in ("vae_decoder", "vae_encoder", "vae_decoder_tiled",
                                                          "vae_encoder_tiled")}
# Graphs with more than this many bytes of weights keep them in one external `<name>.onnx.data` file
# (protobuf caps a serialized model at 2 GiB in any case). Engines read an external file by mmap, and
# OpenVINO's compile hands those pages back (runtime/engines/mapped_weights.py); weights inside the
# .onnx are parsed into a private copy the compiled model keeps: SD 1.5's text encoder held 0.92 GB
# after an OpenVINO compile with its weights inline, the parsed 0.5 GB included. 32 MiB puts every
# full-size network's weights outside and leaves the tiny test models' inside.
EXTERNAL_DATA_BYTES = 2**25
# Graphs with more than this many bytes of weights are exported lean (`_export_lean`): the exporter
# writes the graph alone and the weights go to the external file straight from the PyTorch tensors.
# The plain path holds a second copy of the weights while it serializes (measured: SD 1.5's U-Net,
# 3.4 GB of weights, exported at 7.97 GiB peak RSS with the whole 4.47 GB model loaded), which a
# 10.3 GB SDXL U-Net cannot afford on a 24 GiB machine. Every SD 1.x / 2.x network stays below it.
LEAN_EXPORT_BYTES = 2**32
EXPORTER = f"torch.onnx TorchScript exporter (dynamo=False), opset {OPSET}"
# Networks whose upsamplers (nearest x2, 3x3 conv) are exported as one stride-2 transposed
# convolution (export/upsample.py: 16 multiply-adds per input pixel instead of 36, same output to
# float32 rounding). The tiled decoder's too: its transposed convolutions wrap their border taps.
TRANSPOSED_UPSAMPLE_NETWORKS = ("vae_decoder", "vae_decoder_tiled")


class ParityError(RuntimeError):
    """An exported graph's outputs differ from the PyTorch reference by more than the threshold."""


# --- signature wrappers (shared with runtime/engines/torch.py) ------------------------------------

class TextEncoderWrapper(nn.Module):
    """input_ids int32 [batch, 77] -> last_hidden_state [batch, 77, hidden]; with `penultimate`
    (SDXL) the hidden states before the last layer, as diffusers' StableDiffusionXLPipeline.encode_prompt
    takes them (`hidden_states[-2]`, no final layer norm)."""

    def __init__(self, text_encoder: nn.Module, penultimate: bool = False):
        super().__init__()
        self.text_encoder, self.penultimate = text_encoder, penultimate

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.penultimate:
            return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]
        return self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True).hidden_states[-2]


class TextEncoder2Wrapper(nn.Module):
    """SDXL's text_encoder_2 (CLIPTextModelWithProjection): input_ids int32 [batch, 77] ->
    (hidden_states [batch, 77, hidden] of the penultimate layer, text_embeds [batch, projection]: the
    pooled output projected, diffusers' `pooled_prompt_embeds`)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class UNetWrapper(nn.Module):
    """sample, timestep [batch], encoder_hidden_states (, timestep_cond for an LCM-distilled U-Net)
    -> noise_pred."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond)


class UNetXLWrapper(nn.Module):
    """SDXL: sample, timestep [batch], encoder_hidden_states, text_embeds, time_ids -> noise_pred."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, text_embeds=text_embeds, time_ids=time_ids)


def _conditioning(unet: nn.Module, extra: Sequence[torch.Tensor]) -> tuple[Any, Any, Sequence[torch.Tensor]]:
    """Split a U-Net graph's inputs after encoder_hidden_states, in the contract's order
    (runtime/folder/networks.py `network_io`): timestep_cond (LCM-distilled U-Nets), then text_embeds
    and time_ids (SDXL), then the graph's own; -> (timestep_cond, (text_embeds, time_ids), own)."""
    i, cond, added = 0, None, None
    if unet.config.time_cond_proj_dim is not None:
        cond, i = extra[0], 1
    if unet.config.addition_embed_type:
        added, i = (extra[i], extra[i + 1]), i + 2
    return cond, added, extra[i:]


class UNetDeepWrapper(nn.Module):
    """The U-Net's inputs (timestep_cond for an LCM-distilled U-Net, text_embeds and time_ids for
    SDXL) -> (noise_pred, cache_feature): the full U-Net that also returns the feature cached for
    `branch` (export/unet.py `cache_split`)."""

    def __init__(self, unet: nn.Module, branch: int):
        super().__init__()
        self.unet, self.branch = unet, branch

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, added, _ = _conditioning(self.unet, extra)
        return self.unet.forward_deep(sample, timestep, encoder_hidden_states, self.branch, cond, added)


class UNetShallowWrapper(nn.Module):
    """The U-Net's inputs, then cache_feature -> noise_pred: the retrieval step of `branch`, from
    the feature of the last full step."""

    def __init__(self, unet: nn.Module, branch: int):
        super().__init__()
        self.unet, self.branch = unet, branch

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *extra: torch.Tensor) -> torch.Tensor:
        cond, added, (cache_feature,) = _conditioning(self.unet, extra)
        return self.unet.forward_shallow(sample, timestep, encoder_hidden_states, cache_feature, self.branch, cond,
                                         added)


class ControlNetWrapper(nn.Module):
    """sample, timestep [batch], encoder_hidden_states, controlnet_cond, conditioning_scale [batch,
    residuals] -> down_residual_0.., mid_residual (export/controlnet.py)."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale)


class UNetControlWrapper(nn.Module):
    """The U-Net's inputs (timestep_cond for an LCM-distilled U-Net), then the ControlNet residuals
    (down_residual_0.., mid_residual) -> noise_pred."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.lcm = unet.config.time_cond_proj_dim is not None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        cond, residuals = (rest[0], list(rest[1:])) if self.lcm else (None, list(rest))
        return self.unet.forward_control(sample, timestep, encoder_hidden_states, residuals, cond)


class VAEDecoderWrapper(nn.Module):
    """latent (scaled, as the denoising loop holds it) -> image in [-1, 1], unclamped."""

    def __init__(self, vae: nn.Module, scaling_factor: float):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scaling_factor)


class VAEEncoderWrapper(nn.Module):
    """image in [-1, 1] -> (latent_mean, latent_std), unscaled."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.vae.encode(image)
        return mean, std


def wrap(network: str, model: Any, *, branch: int | None = None) -> nn.Module:
    """The signature wrapper of `network` around a `LoadedModel`'s module, in eval mode. The
    step-cache networks need the cache `branch` (an engine folder records it in their manifest
    entries)."""
    if network in STEP_CACHE_NETWORKS and branch is None:
        raise ValueError(f"{network} needs the step-cache branch (its manifest entry's 'branch'); got none")
    if network in TILING_NETWORKS:  # its base network with circular padding (export/circular.py)
        return circular_padding(wrap(base_network(network), model))
    if network in TINY_VAE_NETWORKS:  # the base VAE network of a model whose vae is the tiny one
        if not isinstance(model.vae, AutoencoderTiny):
            raise ValueError(f"{network} wraps a model whose vae is the tiny VAE (export/loading/taesd.py "
                             f"`with_tiny_vae`); this one's is a {type(model.vae).__name__}")
        return wrap(base_network(network), model)
    if network == "text_encoder":
        module = TextEncoderWrapper(model.text_encoder, penultimate=model.spec.text_encoder_2 is not None)
    elif network == "text_encoder_2":
        module = TextEncoder2Wrapper(model.text_encoder_2)
    elif network == "unet":
        module = UNetXLWrapper(model.unet) if model.unet.config.addition_embed_type else UNetWrapper(model.unet)
    elif network == "unet_deep":
        module = UNetDeepWrapper(model.unet, branch)
    elif network == "unet_shallow":
        module = UNetShallowWrapper(model.unet, branch)
    elif network == CONTROL_UNET:
        module = UNetControlWrapper(model.unet)
    elif controlnet_name(network) is not None:
        module = ControlNetWrapper(model.controlnets[controlnet_name(network)])
    elif network == "vae_decoder":
        module = VAEDecoderWrapper(model.vae, model.spec.vae.scaling_factor)
    elif network == "vae_encoder":
        module = VAEEncoderWrapper(model.vae)
    else:
        raise ValueError(f"unknown network {network!r}; expected one of {', '.join(NETWORKS + OPTIONAL_NETWORKS)}")
    return module.eval()


def step_cache_dims(spec: Any, branch: int) -> ModelDims:
    """The model dims of a folder with step-cache graphs for `branch`: the spec's, plus the cached
    feature's channels and level (runtime/folder/networks.py `cache_feature_spec`)."""
    if spec.unet.time_cond_proj_dim:
        raise ValueError("step caching (--step-cache) is not offered for LCM-distilled (time_cond_proj_dim) U-Nets: "
                         "at their 1-8 steps a cached step is a large share of the schedule; build without it")
    split = cache_split(spec.unet, branch)
    return replace(spec.dims, cache_channels=split.channels, cache_level=split.level)


def control_dims(spec: Any) -> ModelDims:
    """The model dims of a folder with ControlNets: the spec's, plus the U-Net's block channels and
    layers per block, which give the residuals' shapes (runtime/folder/networks.py)."""
    return replace(spec.dims, block_out_channels=tuple(spec.unet.block_out_channels),
                   layers_per_block=spec.unet.layers_per_block)


def network_dims(spec: Any, network: str, branch: int | None = None) -> ModelDims:
    """The dims `network`'s contract reads."""
    if network in STEP_CACHE_NETWORKS:
        return step_cache_dims(spec, branch)
    return control_dims(spec) if base_network(network) in (CONTROL_UNET, CONTROLNET) else spec.dims


# transformers CLIPTextConfig's default vocab_size (the CLIP BPE's 49408 tokens), for a config that omits it
CLIP_VOCAB_SIZE = 49408


def parity_vocab_size(model: Any) -> int:
    """The vocabulary the parity inputs' token ids are drawn from: the first text encoder's, or the SDXL
    refiner's only one (text_encoder_2), read from the spec (the modules are released as they are exported)."""
    text = model.spec.text_encoder if model.spec.text_encoder is not None else model.spec.text_encoder_2
    return int(text.get("vocab_size", CLIP_VOCAB_SIZE))


def size_multiple(spec: Any) -> int:
    """Image sizes must divide by this: the VAE's downsampling times the U-Net's."""
    return spec.vae.vae_scale_factor * 2 ** (len(spec.unet.block_out_channels) - 1)


# --- inputs ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """One request shape: images per batch, pixels, and the text length seen by the U-Net."""

    batch: int
    height: int
    width: int
    tokens: int | None = None

    def as_list(self) -> list[int]:
        return [self.batch, self.height, self.width] + ([self.tokens] if self.tokens else [])


def sample_inputs(network: str, dims: ModelDims, shape: Shape, *, vocab_size: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32/int32 inputs of `network` for one shape, in plausible value ranges."""
    axes = axis_values(dims, shape.batch, shape.height, shape.width, shape.tokens)
    inputs, _ = network_io(network, dims, "fp32")
    feeds = {}
    for spec in inputs:
        size = concrete_shape(spec, axes)
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, vocab_size, size=size, dtype=np.int32)
        elif spec.name == "timestep":
            # fractional, as the Euler-family samplers feed them (e.g. 946.42): checks that the graph
            # does not round the timestep
            feeds[spec.name] = (rng.integers(0, 999, size=size) + rng.uniform(0.05, 0.95, size=size)).astype(np.float32)
        elif spec.name == "time_ids":  # SDXL's sizes and crop offsets, in pixels
            feeds[spec.name] = rng.integers(0, 1025, size=size).astype(np.float32)
        elif spec.name == "image":
            feeds[spec.name] = rng.uniform(-1.0, 1.0, size=size).astype(np.float32)
        elif spec.name in ("controlnet_cond", "conditioning_scale"):  # a control image in [0, 1]; scales
            feeds[spec.name] = rng.uniform(0.0, 1.0, size=size).astype(np.float32)
        else:
            feeds[spec.name] = rng.standard_normal(size=size, dtype=np.float32)
    return feeds


def _cast_feeds(feeds: dict[str, np.ndarray], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    return {t.name: feeds[t.name].astype(t.dtype, copy=False) for t in specs}


# --- export ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportResult:
    network: str
    file: str  # file name inside the output folder
    external_data: str | None
    precision: str  # precision of the graph's weights and float I/O
    parity: dict[str, Any]
    seconds: float


def export_network(network: str, model: Any, out_dir: str | Path, *, precision: str = "fp32",
                   parity_shapes: Sequence[Shape], threshold: float | None = None,
                   external_data: bool | None = None, threads: int | None = None,
                   branch: int | None = None, lean: bool | None = None) -> ExportResult:
    """Export `network` of a `LoadedModel` to `out_dir/<network>.onnx` (+ `.onnx.data` past 32 MiB),
    check it, and compare it with the PyTorch fp32 reference at `parity_shapes`.
    `precision` is the graph's: "fp32" or "fp16" (bf16 engines run an fp32 graph). `threshold` overrides
    `PARITY_THRESHOLDS[precision]` (and `VAE_PARITY_THRESHOLDS`); `external_data` forces the weights
    into (True) or out of (False) a `.onnx.data` file, by default past EXTERNAL_DATA_BYTES. `branch`: the
    cache branch of the step-cache networks (unet_deep, unet_shallow). `lean`: the graph without weights,
    these streamed to the external file (default: past LEAN_EXPORT_BYTES). `ParityError` over the
    threshold; the destination files exist only if everything passed."""
    if precision not in PARITY_THRESHOLDS:
        raise ValueError(f"ONNX graphs are fp32 or fp16, not {precision!r} (bf16 runs an fp32 graph)")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    final = out_dir / f"{network}.onnx"
    data_name = f"{network}.onnx.data"
    reference = wrap(network, model, branch=branch)
    dims = network_dims(model.spec, network, branch)
    inputs, outputs = network_io(network, dims, precision)
    # Tracing runs one forward pass. float16 convolutions on a CPU without native fp16 arithmetic
    # take ~400x their float32 time (measured: 19 s vs 0.04 s for one 128-channel 3x3 conv at
    # 64x96), so fp16 graphs are traced on a CUDA device where there is one.
    device = "cuda" if precision == "fp16" and torch.cuda.is_available() else "cpu"
    vocab = parity_vocab_size(model)
    scratch = Path(tempfile.mkdtemp(prefix=f".export-{network}-", dir=out_dir))
    try:
        rng = np.random.default_rng(0)
        # Trace at a small shape with no size-1 or equal axes to specialize on (a float16 forward
        # pass on the CPU is slow: tracing the full-size VAE decoder at 256 px takes minutes).
        m = size_multiple(model.spec) if base_network(network) in GUIDED_NETWORKS else model.spec.vae_scale_factor
        trace_shape = Shape(2, 2 * m, 3 * m, 2 * dims.text_max_length)
        example = _cast_feeds(sample_inputs(network, dims, trace_shape, vocab_size=vocab, rng=rng), inputs)
        module = _traced_module(network, reference, precision, device)
        weight_bytes = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
        lean = weight_bytes > LEAN_EXPORT_BYTES if lean is None else lean
        external = lean or (weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data)
        if lean:
            _export_lean(module, example, inputs, outputs, scratch / final.name, data_name, device)
            del module
        else:
            raw = scratch / "raw" / final.name
            raw.parent.mkdir()
            _torch_export(module, example, inputs, outputs, raw, device)
            del module
            gc.collect()
            _finalize(raw, scratch / final.name, data_name if external else None)
            shutil.rmtree(raw.parent)
        parity = check_parity(network, reference, scratch / final.name, dims, precision, parity_shapes,
                              vocab_size=vocab, threshold=_threshold(network, model, precision, threshold),
                              threads=threads, lean=lean)
        for name in (final.name, data_name):
            if (scratch / name).exists():
                (scratch / name).replace(out_dir / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        gc.collect()
    return ExportResult(network, final.name, data_name if external else None, precision, parity,
                        time.perf_counter() - start)


def _traced_module(network: str, reference: nn.Module, precision: str, device: str) -> nn.Module:
    """The module the exporter traces for `reference`, which is left as it is: the upsamplers of
    `TRANSPOSED_UPSAMPLE_NETWORKS` as transposed convolutions, and a float16 copy for fp16 graphs."""
    text = network in ("text_encoder", "text_encoder_2")
    module = copy.deepcopy(reference) if precision == "fp16" or text else reference
    if network in TRANSPOSED_UPSAMPLE_NETWORKS:
        module = transposed_upsamplers(module)  # shares the reference's other weights (export/upsample.py)
    if precision == "fp16":
        reduced_precision(module, torch.float16).to(device)  # normalizations stay fp32 (export/fp16.py)
    if text:
        # The exporter's SDPA-with-mask symbolic upcasts to float32 and leaves float16 graphs
        # invalid (LayerNormalization with mixed types); eager attention exports cleanly.
        module.text_encoder.set_attn_implementation("eager")
    return module


# --- step cache (DeepCache) ------------------------------------------------------------------------

# The weights file unet, unet_deep and unet_shallow share (export/external_data.py).
STEP_CACHE_DATA = "unet.onnx.data"


@dataclass(frozen=True)
class StepCacheExport:
    results: dict[str, ExportResult]  # unet_deep, unet_shallow (external_data: the shared file)
    sizes: dict[str, dict[str, int]]  # unet, unet_deep, unet_shallow: graph_bytes, weights_bytes
    data_file: str  # the weights file the three U-Net graphs share
    consistency: dict[str, Any]  # `check_step_cache` on the final files


def export_step_cache(model: Any, out_dir: str | Path, *, branch: int, precision: str = "fp32",
                      parity_shapes: Sequence[Shape], threads: int | None = None) -> StepCacheExport:
    """Export unet_deep and unet_shallow for cache `branch` beside `out_dir/unet.onnx` (exported
    first, by export_network("unet", ...)), each checked against the PyTorch reference split; then
    point the three U-Net graphs at one weights file, `STEP_CACHE_DATA` (the step-cache graphs add
    almost nothing to the folder), and check the final files against each other
    (`check_step_cache`). On a failure `out_dir` is left half-rewritten: build into a scratch folder
    (build-engine does)."""
    out_dir = Path(out_dir)
    if not (out_dir / "unet.onnx").is_file():
        raise FileNotFoundError(f"{out_dir} has no unet.onnx: export the unet before its step-cache graphs")
    results = {network: export_network(network, model, out_dir, precision=precision, parity_shapes=parity_shapes,
                                       threads=threads, branch=branch)
               for network in STEP_CACHE_NETWORKS}
    files = {network: f"{network}.onnx" for network in UNET_NETWORKS}
    by_file = share_weights(out_dir, list(files.values()), STEP_CACHE_DATA)
    # one shape: each graph met the PyTorch split at all of them already; this checks the final files
    consistency = check_step_cache(out_dir, step_cache_dims(model.spec, branch), precision, parity_shapes[:1],
                                   vocab_size=parity_vocab_size(model), threads=threads)
    return StepCacheExport({n: replace(r, external_data=STEP_CACHE_DATA) for n, r in results.items()},
                           {n: by_file[f] for n, f in files.items()}, STEP_CACHE_DATA, consistency)


def check_step_cache(folder: str | Path, dims: ModelDims, precision: str, shapes: Sequence[Shape], *,
                     vocab_size: int, threshold: float | None = None, threads: int | None = None) -> dict[str, Any]:
    """The three U-Net graphs in `folder` against each other in ONNX Runtime (CPU), on the same
    random sample, timestep and text at each shape: unet_deep's noise against unet's, and
    unet_shallow fed unet_deep's cache_feature against unet_deep's noise (with the feature of the
    same inputs the shallow path recomputes exactly what the deep one did around it). Raises
    `ParityError` over the threshold of `precision`; returns the worst relative errors. One session
    at a time, so a full-size check holds one copy of the weights."""
    import onnxruntime as ort

    threshold = PARITY_THRESHOLDS[precision] if threshold is None else threshold
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    inputs, _ = network_io("unet", dims, precision)
    rng = np.random.default_rng(2)
    cases = [_cast_feeds(sample_inputs("unet", dims, s, vocab_size=vocab_size, rng=rng), inputs) for s in shapes]
    out: dict[str, list[list[np.ndarray]]] = {}
    for network in UNET_NETWORKS:  # unet, unet_deep, then unet_shallow on unet_deep's features
        session = ort.InferenceSession(str(Path(folder) / f"{network}.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        names = [t.name for t in network_io(network, dims, precision)[1]]  # noise_pred (, cache_feature)
        out[network] = [session.run(names, feeds if network != "unet_shallow" else
                                    {**feeds, "cache_feature": out["unet_deep"][i][1]})
                        for i, feeds in enumerate(cases)]
        del session
    worst = {"deep_vs_unet": max(rel_err(d[0], u[0]) for d, u in zip(out["unet_deep"], out["unet"])),
             "shallow_vs_deep": max(rel_err(s[0], d[0]) for s, d in zip(out["unet_shallow"], out["unet_deep"]))}
    bad = {k: v for k, v in worst.items() if not v <= threshold}
    if bad:
        raise ParityError(f"step-cache graphs in {folder} ({precision}) disagree: "
                          + ", ".join(f"{k} relative error {v:.3g}" for k, v in bad.items())
                          + f"; threshold {threshold:g}")
    return {"runtime": "onnxruntime CPU", "threshold": threshold, **worst}


def _export_lean(module: nn.Module, example: dict[str, np.ndarray], inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], dest: Path, data_name: str, device: str) -> None:
    """Export the graph without weights (they become inputs named by their state-dict keys), then
    make those inputs initializers in `dest.parent/data_name`, written from the module's own tensor
    memory (export/external_data.py attach_weights). No constant folding: a Linear's weight is
    transposed by a node the engines fold when they load the graph."""
    _torch_export(module, example, inputs, outputs, dest, device, export_params=False)
    weights = {name: t.detach().cpu().numpy() for name, t in
               (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))}
    attach_weights(dest, weights, data_name)
    shutil.copymode(dest, dest.parent / data_name)
    onnx.shape_inference.infer_shapes_path(str(dest), str(dest), check_type=True, data_prop=True)
    onnx.checker.check_model(str(dest), full_check=True)


# --- ControlNet -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ControlExport:
    results: dict[str, ExportResult]  # unet_control (external_data: the shared file), controlnet.NAME...
    sizes: dict[str, dict[str, int]]  # the U-Net graphs now sharing STEP_CACHE_DATA: graph_bytes, weights_bytes
    final_file: dict[str, Any]  # unet_control's parity on its final file, at the first shape


def export_control(model: Any, out_dir: str | Path, *, precision: str = "fp32", parity_shapes: Sequence[Shape],
                   threads: int | None = None) -> ControlExport:
    """Export unet_control (the U-Net with ControlNet residual inputs) beside `out_dir/unet.onnx`
    and one graph per ControlNet of `model.controlnets` ("controlnet.NAME"), each checked against
    the PyTorch reference; unet_control and the U-Net graphs already there (unet, the step-cache and
    tiled U-Nets) are then pointed at one weights file, `STEP_CACHE_DATA`, and unet_control is
    checked again on its final file. On a failure `out_dir` is left half-rewritten: build into a
    scratch folder (build-engine does)."""
    out_dir = Path(out_dir)
    if not (out_dir / "unet.onnx").is_file():
        raise FileNotFoundError(f"{out_dir} has no unet.onnx: export the unet before unet_control")
    results = {CONTROL_UNET: export_network(CONTROL_UNET, model, out_dir, precision=precision,
                                            parity_shapes=parity_shapes, threads=threads)}
    family = [n for n in ("unet",) + STEP_CACHE_NETWORKS + ("unet_tiled",) if (out_dir / f"{n}.onnx").is_file()]
    by_file = share_weights(out_dir, [f"{n}.onnx" for n in family + [CONTROL_UNET]], STEP_CACHE_DATA)
    final = check_parity(CONTROL_UNET, wrap(CONTROL_UNET, model), out_dir / f"{CONTROL_UNET}.onnx",
                         control_dims(model.spec), precision, parity_shapes[:1],
                         vocab_size=parity_vocab_size(model), threads=threads)
    results[CONTROL_UNET] = replace(results[CONTROL_UNET], external_data=STEP_CACHE_DATA)
    for name in model.controlnets:
        network = f"{CONTROLNET}.{name}"
        results[network] = export_network(network, model, out_dir, precision=precision, parity_shapes=parity_shapes,
                                          threads=threads)
    return ControlExport(results, {n: by_file[f"{n}.onnx"] for n in family + [CONTROL_UNET]}, final)


def _torch_export(module: nn.Module, example: dict[str, np.ndarray], inputs: Sequence[TensorSpec],
                  outputs: Sequence[TensorSpec], path: Path, device: str, *, export_params: bool = True) -> None:
    args = tuple(torch.from_numpy(example[t.name]).to(device) for t in inputs)
    dynamic_axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*inputs, *outputs)}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python-level shape test (parity at two shapes is the check),
        # the exporter about constant folding it skips; neither is actionable here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            module, args, str(path), input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
            dynamic_axes={k: v for k, v in dynamic_axes.items() if v}, opset_version=OPSET,
            do_constant_folding=export_params, export_params=export_params, dynamo=False,
        )
    _declare_unused_inputs(path, inputs)


def _declare_unused_inputs(path: Path, inputs: Sequence[TensorSpec]) -> None:
    """Keep the network contract's input list: the exporter drops an input the traced path never
    reads (unet_shallow's encoder_hidden_states where the shallow blocks have no cross-attention, as
    in the demo model), and the engines feed every contract input by name. Declare such an input
    again, unused, with its dtype and symbolic shape, in the contract's order."""
    proto = onnx.load(str(path), load_external_data=False)
    present = {i.name for i in proto.graph.input}
    if all(t.name in present for t in inputs):
        return
    by_name = {i.name: i for i in proto.graph.input}
    ordered = [by_name.get(t.name) or onnx.helper.make_tensor_value_info(
        t.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), list(t.shape)) for t in inputs]
    extra = [i for i in proto.graph.input if i.name not in {t.name for t in inputs}]
    del proto.graph.input[:]
    proto.graph.input.extend(ordered + extra)
    onnx.save_model(proto, str(path))


def _finalize(raw: Path, dest: Path, external_data: str | None) -> None:
    """Shape-infer, check and save `raw` as `dest`, weights in `dest.parent/external_data` if given."""
    if external_data is None:
        proto = onnx.shape_inference.infer_shapes(onnx.load(str(raw)), check_type=True, data_prop=True)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save_model(proto, str(dest))
        return
    proto = onnx.load(str(raw))  # the exporter wrote its own scattered external files next to raw
    onnx.save_model(proto, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=external_data, size_threshold=1024)
    del proto
    gc.collect()
    shutil.copymode(dest, dest.parent / external_data)  # onnx creates the data file private (0600)
    onnx.shape_inference.infer_shapes_path(str(dest), str(dest), check_type=True, data_prop=True)
    onnx.checker.check_model(str(dest), full_check=True)


# --- parity ----------------------------------------------------------------------------------------

def default_parity_shapes(spec: Any, min_image: int, opt_image: int, max_image: int, max_batch: int) -> list[Shape]:
    """Two request shapes: one image at the optimal size, then a batch of two (if allowed) of a
    non-square size with two prompt chunks of text, both within the build's shape range. The second
    width is a multiple of the VAE scale factor but not of `size_multiple`, so the U-Net's odd-sized
    skips take the crop path of its upsamplers (as a 264-pixel SD 1.5 image does)."""
    s = spec.vae_scale_factor
    width = opt_image + s if opt_image + s <= max_image else opt_image - s
    if not min_image <= width <= max_image:
        width = opt_image
    tokens = 2 * spec.dims.text_max_length
    return [Shape(1, opt_image, opt_image), Shape(min(2, max_batch), opt_image, width, tokens)]


def _threshold(network: str, model: Any, precision: str, given: float | None) -> float | None:
    """`given`, else a KL VAE graph's own bound (`VAE_PARITY_THRESHOLDS`; not an AutoencoderTiny's),
    else None: `check_parity` takes `PARITY_THRESHOLDS[precision]`."""
    if given is not None or getattr(model.spec.vae, "kind", None) is not None:
        return given
    return VAE_PARITY_THRESHOLDS.get((network, precision))


def check_parity(network: str, reference: nn.Module, onnx_path: str | Path, dims: ModelDims, precision: str,
                 shapes: Sequence[Shape], *, vocab_size: int, threshold: float | None = None,
                 threads: int | None = None, lean: bool = False) -> dict[str, Any]:
    """Run the ONNX graph in ONNX Runtime (CPU) and the fp32 reference at `shapes`; raise
    `ParityError` if max|ort - ref| / max|ref| passes the threshold for `precision`. Returns the
    errors (worst over shapes and outputs, and per shape). `lean`: the session keeps the weights
    where they are (memory-mapped from the external file, no graph optimizations that would copy
    them, no pre-packing), so the check adds no anonymous copy of a large network's weights."""
    import onnxruntime as ort

    threshold = PARITY_THRESHOLDS[precision] if threshold is None else threshold
    inputs, outputs = network_io(network, dims, precision)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    if lean:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    cases = []
    try:
        for shape in shapes:
            # Round the inputs to the graph's dtype first, so both sides see the same values.
            feeds = _cast_feeds(sample_inputs(network, dims, shape, vocab_size=vocab_size, rng=rng), inputs)
            with torch.no_grad():
                ref = reference(*(torch.from_numpy(feeds[t.name].astype(np.float32) if t.dtype == "float16"
                                                   else feeds[t.name]) for t in inputs))
            ref = (ref,) if isinstance(ref, torch.Tensor) else ref
            got = session.run([t.name for t in outputs], feeds)
            case: dict[str, Any] = {"shape": shape.as_list(), "max_abs": 0.0, "rel": 0.0}
            for spec, r, g in zip(outputs, ref, got):
                r = r.numpy()
                if g.shape != r.shape:
                    raise ParityError(f"{network}: output {spec.name!r} has shape {g.shape} in ONNX Runtime, "
                                      f"{r.shape} in PyTorch, at shape {shape.as_list()}")
                err, rel = max_errors(g, r)
                case["max_abs"], case["rel"] = max(case["max_abs"], err), max(case["rel"], rel)
            cases.append(case)
    finally:
        del session
    worst = max(cases, key=lambda c: c["rel"])
    result = {"reference": "pytorch fp32", "runtime": "onnxruntime CPU", "threshold": threshold,
              "max_abs": max(c["max_abs"] for c in cases), "rel": worst["rel"], "cases": cases}
    if worst["rel"] > threshold:
        raise ParityError(f"{network} ({precision}): ONNX Runtime differs from PyTorch by relative error "
                          f"{worst['rel']:.3g} (max abs {worst['max_abs']:.3g}) at shape {worst['shape']}; "
                          f"threshold {threshold:g}")
    return result

"""Reduced-precision copies of the reference networks whose normalizations compute in float32.

A GroupNorm or LayerNorm over fp16 activations sums squares that leave fp16's range (max 65504);
TensorRT's builder warns about exactly this ("Running layernorm after self-attention in FP16 may
cause overflow ... forcing layernorm layers to run in FP32 precision can help with preserving
accuracy"). NVIDIA's Stable Diffusion demo (NVIDIA/TensorRT demo/Diffusion) exports fp16 models and
builds every engine strongly typed (`polygraphy convert --strongly-typed`, demo_diffusion/engine.py),
so the types written in the graph are the types TensorRT runs; TensorRT 11 has no other mode
(weak typing was deprecated in 10.12 and removed in 11.0; NVIDIA/TensorRT
.agents/skills/trt-strong-typing-migration). Our fp16 graphs therefore say it themselves: each
normalization is wrapped so that its input is cast to float32, its weights stay float32, and its
output is cast back to the network's dtype. In ONNX that is Cast -> InstanceNormalization /
LayerNormalization (+ the affine Mul/Add) in float32 -> Cast, which a strongly typed TensorRT
network keeps as written and `export/trt_compat.py` checks offline.

Softmax where fp16 overflows is the model's own business: SD 2.x configs set `upcast_attention`, and
export/unet.py's Attention then computes QK^T and the softmax in float32 (the graph says so, and
`export/trt_compat.py --require-fp32 Softmax` checks it). SD 1.x U-Net attention and CLIP's stay
fp16 in the graph, as diffusers and NVIDIA's demo run them (measured on the tiny presets:
tiny-sd2's 8 U-Net softmaxes are float32, tiny-sd1's float16). The SD 1.x VAE, whose attention does
overflow, stays an fp32 graph in fp16 folders (`force_upcast`, export/build.py).
"""

from __future__ import annotations

import torch
from torch import nn

# The normalization modules the reference networks use (export/unet.py, export/vae.py, CLIP).
NORMALIZATIONS = (nn.GroupNorm, nn.LayerNorm)


class Fp32Normalization(nn.Module):
    """A normalization computed in float32 inside a reduced-precision network: the input is cast
    up, the weights are float32, the output is cast back to the input's dtype."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def keep_fp32_normalizations(module: nn.Module) -> nn.Module:
    """Wrap every GroupNorm / LayerNorm of `module` (in place) in an `Fp32Normalization`; returns
    `module`. Call it after casting the module to float16 or bfloat16. Idempotent."""
    for parent in list(module.modules()):
        if isinstance(parent, Fp32Normalization):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, NORMALIZATIONS):
                setattr(parent, name, Fp32Normalization(child))
    return module


def reduced_precision(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` (in place) in `dtype` (float16 or bfloat16) with its normalizations in float32; the
    recipe of the project's fp16 graphs, also used by the PyTorch reference engine on CUDA."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"reduced precision is float16 or bfloat16, not {dtype}")
    return keep_fp32_normalizations(module.to(dtype))

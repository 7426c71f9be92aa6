"""Nearest x2 upsampling followed by a 3x3 convolution, exported as one transposed convolution.

The VAE decoder's and the U-Net's upsamplers (`Upsample2D`: nearest x2, then a 3x3 convolution
with zero padding 1) repeat each input pixel four times and then convolve; three of every nine
multiplications land on a repeated pixel. Per dimension, output phase a of pixel i sees

    phase 0 (row 2i):    w[-1] x[i-1] + (w[0] + w[1]) x[i]
    phase 1 (row 2i+1):  (w[-1] + w[0]) x[i] + w[1] x[i+1]

(x[-1] = x[n] = 0, the padding), which is exactly a transposed convolution with kernel 4, stride 2,
padding 1 whose four taps are (w[1], w[0] + w[1], w[-1] + w[0], w[-1]): output y = 2i + k - 1
receives x[i] through tap k (ONNX ConvTranspose, PyTorch `conv_transpose2d`). In 2D the kernel is
`TAPS @ w @ TAPS.T` per (out, in) pair: 16 multiplications per input pixel and channel pair where
the upsample-then-convolve form does 4 * 9 = 36, with no upsampled tensor in between. The sums of
weights are formed in float64 and rounded once, so the graph agrees with the reference to float32
rounding (the export's parity check holds it to `PARITY_THRESHOLDS`).

SD 1.5's VAE decoder at 256 px: the three upsamplers are 28% of its multiply-adds (87.0 of 311.1
GMAC); transposed, the decoder does 262.8 (`python -m benchmarks.vae_decode`; times in
docs/benchmarks.md, "VAE decode").

With circular padding (A1111's tiling, export/circular.py) the 3x3 convolution reads x[n-1] for
x[-1] and x[0] for x[n]: the same sums over indices taken mod n. That is the transposed
convolution of the input circularly padded by one pixel on each side, cropped by 3 where it was
cropped by 1 (padding 3: the padded input's first pixel, x[n-1], contributes to the same outputs
as x[-1] did before), so the tiled decoder's upsamplers stay one transposed convolution each.

Only the exported graph changes: the PyTorch reference keeps diffusers' form and its module names
(checkpoint keys). `transposed_upsamplers(module)` returns a module that shares every parameter
with `module` except the upsamplers, which it replaces; `module` itself is not modified.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from export.rewrite import swapped
from export.unet import Upsample2D

# Row k of TAPS: which of the 3x3 kernel's taps (w[-1], w[0], w[1]) sum into tap k of the
# stride-2 transposed kernel (derivation in the module docstring).
TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution's weight [out, in, 3, 3] -> the kernel [in, out, 4, 4] of the stride-2
    transposed convolution equal to nearest x2 upsampling followed by that convolution."""
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"expected a 3x3 convolution weight [out, in, 3, 3], got {tuple(weight.shape)}")
    taps = TAPS.to(weight.device)
    return torch.einsum("kp,oipq,lq->iokl", taps, weight.detach().double(), taps).to(weight.dtype)


class TransposedUpsample2D(nn.Module):
    """`Upsample2D` as one transposed convolution (same call signature)."""

    def __init__(self, upsample: Upsample2D):
        super().__init__()
        conv = upsample.conv
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1) \
                or conv.groups != 1 or conv.padding_mode not in ("zeros", "circular"):
            raise ValueError(f"expected a 3x3 convolution with stride 1 and zero or circular padding 1, got {conv}")
        self.circular = conv.padding_mode == "circular"  # derivation in the module docstring
        self.weight = nn.Parameter(transposed_weight(conv.weight), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        if like is not None and (like.shape[2] != 2 * x.shape[2] or like.shape[3] != 2 * x.shape[3]):
            # An odd-sized skip crops the upsampled image before the convolution, whose border then
            # sees padding where this form sees the repeated pixel. Sizes that divide by the U-Net's
            # size multiple never have one (runtime/folder/networks.py); this fails loudly if traced with one.
            raise ValueError(f"a transposed upsampler needs an even-sized skip, got {tuple(like.shape[2:])} for "
                             f"input {tuple(x.shape[2:])}")
        if self.circular:
            return F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="circular"), self.weight, self.bias, stride=2,
                                      padding=3)
        return F.conv_transpose2d(x, self.weight, self.bias, stride=2, padding=1)


def transposed_upsamplers(module: nn.Module) -> nn.Module:
    """`module` with every `Upsample2D` replaced by a `TransposedUpsample2D`: a shallow copy along
    the path to each replaced module, sharing all other submodules and parameters (export/rewrite.py);
    `module` is not modified. Returns `module` itself when it has no `Upsample2D`."""
    return swapped(module, lambda m: TransposedUpsample2D(m) if isinstance(m, Upsample2D) else None)

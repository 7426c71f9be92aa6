"""Upsamplers exported as one transposed convolution (export/upsample.py): the same values as the
reference's nearest x2 + 3x3 conv, the reference left as it is, and the graph build-engine writes."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from export.configs import preset
from export.unet import Upsample2D
from export.upsample import TransposedUpsample2D, transposed_upsamplers, transposed_weight
from export.vae import AutoencoderKL


def _upsampler(channels: int, seed: int, dtype=torch.float32) -> Upsample2D:
    torch.manual_seed(seed)
    module = Upsample2D(channels).to(dtype)
    with torch.no_grad():
        module.conv.bias.normal_()  # the default init's bias is tiny; a real one is not
    return module.eval()


@pytest.mark.parametrize("height,width", [(1, 1), (2, 3), (5, 7), (8, 8)])
def test_equals_upsample_then_conv_exactly_in_float64(height, width):
    up = _upsampler(6, seed=height * 10 + width, dtype=torch.float64)
    x = torch.randn(2, 6, height, width, dtype=torch.float64)
    with torch.no_grad():
        want, got = up(x), TransposedUpsample2D(up)(x)
    assert got.shape == (2, 6, 2 * height, 2 * width)
    # the same products summed in another order: float64 rounding only
    assert torch.abs(got - want).max().item() <= 1e-12 * torch.abs(want).max().item()


def test_float32_within_rounding_and_every_border_pixel_checked():
    up = _upsampler(16, seed=3)
    x = torch.randn(1, 16, 9, 11) * 3
    with torch.no_grad():
        want, got = up(x), TransposedUpsample2D(up)(x)
    rel = (torch.abs(got - want) / torch.abs(want).max()).amax(dim=(0, 1))
    assert rel.max().item() < 1e-6, rel.max().item()
    # a wrong tap order shows first on the borders (padding) and on one output phase
    for a in (0, 1):
        for b in (0, 1):
            assert rel[a::2, b::2].max().item() < 1e-6


def test_transposed_weight_taps():
    w = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    w[0, 0] = torch.arange(1.0, 10.0).reshape(3, 3)  # rows (w[-1], w[0], w[1]) = (1 2 3 / 4 5 6 / 7 8 9)
    k = transposed_weight(w)[0, 0]
    # tap rows/cols: (w[1], w[0] + w[1], w[-1] + w[0], w[-1])
    rows = torch.stack([w[0, 0, 2], w[0, 0, 1] + w[0, 0, 2], w[0, 0, 0] + w[0, 0, 1], w[0, 0, 0]])
    want = torch.stack([rows[:, 2], rows[:, 1] + rows[:, 2], rows[:, 0] + rows[:, 1], rows[:, 0]], dim=1)
    assert torch.equal(k, want)
    assert k.sum().item() == 4 * w.sum().item()  # each 3x3 tap reaches 4 of the 16


def test_bad_convolutions_are_refused():
    with pytest.raises(ValueError, match="3x3"):
        transposed_weight(torch.zeros(4, 4, 1, 1))
    up = _upsampler(4, seed=0)
    up.conv = torch.nn.Conv2d(4, 4, 3, padding=0)
    with pytest.raises(ValueError, match="padding 1"):
        TransposedUpsample2D(up)


def test_odd_skip_is_refused_not_miscomputed():
    up = TransposedUpsample2D(_upsampler(4, seed=1))
    x = torch.randn(1, 4, 4, 4)
    assert up(x, torch.zeros(1, 4, 8, 8)).shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="even-sized skip"):
        up(x, torch.zeros(1, 4, 7, 8))


def test_the_reference_is_not_modified_and_other_weights_are_shared():
    vae = AutoencoderKL(preset("tiny-sd1").vae).eval()
    before = copy.deepcopy(vae.state_dict())
    swapped = transposed_upsamplers(vae)
    assert swapped is not vae
    ups = [m for m in vae.modules() if isinstance(m, Upsample2D)]
    assert ups and not any(isinstance(m, TransposedUpsample2D) for m in vae.modules())
    assert sum(isinstance(m, TransposedUpsample2D) for m in swapped.modules()) == len(ups)
    assert not any(isinstance(m, Upsample2D) for m in swapped.modules())
    assert swapped.encoder is vae.encoder and swapped.decoder.mid_block is vae.decoder.mid_block
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in before.items())
    assert set(vae.state_dict()) == set(before)
    z = torch.randn(1, vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        want, got = vae.decode(z), swapped.decode(z)
    assert torch.abs(got - want).max().item() <= 1e-5 * torch.abs(want).max().item()
    # nothing to replace: the module itself
    assert transposed_upsamplers(vae.encoder) is vae.encoder


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_build_engine_exports_the_decoder_upsamplers_transposed(tiny_sd1_engine):
    decoder, unet = _ops(tiny_sd1_engine / "vae_decoder.onnx"), _ops(tiny_sd1_engine / "unet.onnx")
    assert "ConvTranspose" in decoder and "Resize" not in decoder
    # the U-Net keeps its form (no measured gain; odd skips): nearest Resize then Conv
    assert "Resize" in unet and "ConvTranspose" not in unet


def test_full_size_decoder_counts_fewer_multiply_adds():
    from benchmarks.vae_decode import multiply_adds

    counts = multiply_adds(256)
    before, after = counts["upsample+conv"]["convolution"], counts["transposed"]["convolution"]
    # SD 1.5 decoder, 256 px: the three upsamplers' 3x3 convs at 64, 128 and 256 px are
    # 9 * (64^2 * 512^2 + 128^2 * 512^2 + 256^2 * 256^2) multiply-adds; transposed they take 16/36 of that
    upsamplers = 9 * (64 ** 2 * 512 ** 2 + 128 ** 2 * 512 ** 2 + 256 ** 2 * 256 ** 2) / 1e9
    assert before - after == pytest.approx(upsamplers * 20 / 36, rel=1e-9)

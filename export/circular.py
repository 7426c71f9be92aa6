"""Circular padding for seamless textures: A1111's `tiling`, as graph variants of the folder.

AUTOMATIC1111 v1.10 (modules/sd_hijack.py `StableDiffusionModelHijack.apply_circular`, called from
modules/processing.py `process_images_inner` with `p.tiling`) sets `padding_mode = "circular"` on
every `torch.nn.Conv2d` of the whole model: the U-Net and both halves of the VAE. A padded
convolution then reads the opposite edge where it read zeros, so the image wraps around and tiles
without a seam. Convolutions without padding (1x1 projections, the VAE encoder's downsamplers,
which pad right and bottom with zeros themselves: `Downsample2D` with padding 0) are unaffected, as
in A1111, where padding_mode only acts through a convolution's own padding.

`circular_padding(module)` returns that variant of a reference module without modifying it (its
parameters are shared). The ONNX export of `unet_tiled`, `vae_decoder_tiled` and
`vae_encoder_tiled` (runtime/folder/networks.py TILING_NETWORKS) wraps the reference this way and
holds the graph to the circular reference with the export's parity check; `export_tiling` exports
the three and points each at its base network's weights file (export/external_data.py), so a tiled
graph adds its graph bytes only. The decoder's upsamplers, exported as one stride-2 transposed
convolution (export/upsample.py), wrap their border taps the same way there.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from export.external_data import share_weights
from export.rewrite import swapped
from runtime.folder.networks import STEP_CACHE_NETWORKS, TILING_NETWORKS, base_network

# The padding mode A1111's `apply_circular(True)` sets (torch.nn.Conv2d `padding_mode`)
CIRCULAR = "circular"


def _padded(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and any(p != 0 for p in conv._reversed_padding_repeated_twice)


def circular_padding(module: nn.Module) -> nn.Module:
    """`module` with every padded `nn.Conv2d` switched to circular padding: a shallow copy along the
    path to each such convolution, sharing every parameter (export/rewrite.py); `module` itself is
    not modified. Returns `module` when it has no padded convolution."""
    return swapped(module, _circular)


def _circular(module: nn.Module) -> nn.Module | None:
    if not _padded(module):
        return None
    conv = copy.copy(module)  # shares the parameter dict: same weights
    conv.padding_mode = CIRCULAR
    return conv


@dataclass(frozen=True)
class TilingExport:
    results: dict[str, Any]  # unet_tiled, vae_decoder_tiled, vae_encoder_tiled: ExportResult (shared data file)
    sizes: dict[str, dict[str, int]]  # every rewritten graph: graph_bytes, weights_bytes
    data_files: dict[str, str]  # every rewritten graph -> the weights file it now reads (`<base>.onnx.data`)


def export_tiling(model: Any, out_dir: str | Path, *, precision_of: Any, parity_shapes: Sequence[Any],
                  threads: int | None = None) -> TilingExport:
    """Export the circular-padded variants of unet, vae_decoder and vae_encoder beside them in
    `out_dir` (exported first), each checked against the PyTorch reference with circular padding
    (export/onnx_export.py `export_network`: `PARITY_THRESHOLDS`); then point each variant and its
    base network (and the step-cache U-Nets where the folder has them) at one weights file,
    `<base>.onnx.data`, and check the variants again on those final files at the first shape.
    `precision_of(network)` is each graph's precision. On a failure `out_dir` is left
    half-rewritten: build into a scratch folder (build-engine does)."""
    from export.onnx_export import check_parity, export_network, parity_vocab_size, wrap

    out_dir = Path(out_dir)
    results, sizes, data_files = {}, {}, {}
    for network in TILING_NETWORKS:
        base = base_network(network)
        if not (out_dir / f"{base}.onnx").is_file():
            raise FileNotFoundError(f"{out_dir} has no {base}.onnx: export it before its tiled variant")
        result = export_network(network, model, out_dir, precision=precision_of(base), parity_shapes=parity_shapes,
                                threads=threads)
        family = [base] + ([n for n in STEP_CACHE_NETWORKS if (out_dir / f"{n}.onnx").is_file()]
                           if base == "unet" else []) + [network]
        data_files.update({n: f"{base}.onnx.data" for n in family})
        by_file = share_weights(out_dir, [f"{n}.onnx" for n in family], data_files[base])
        sizes.update({n: by_file[f"{n}.onnx"] for n in family})
        final = check_parity(network, wrap(network, model), out_dir / result.file, model.spec.dims,
                             precision_of(base), parity_shapes[:1], vocab_size=parity_vocab_size(model),
                             threads=threads)
        results[network] = replace(result, external_data=data_files[base],
                                   parity={**result.parity, "final_file": final})
    return TilingExport(results, sizes, data_files)

"""Pixels: image and mask conversion (images.py), tiled VAE (tiling.py), live previews
(preview.py) and PNG metadata (png_info.py)."""

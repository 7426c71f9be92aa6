"""Pixels: image and mask conversion (images.py), tiled VAE (tiling.py), live previews
(preview.py), PNG metadata (png_info.py) and A1111's inpainting: mask blur, crop, fill, overlay
(inpainting.py)."""

"""Pixels: image and mask conversion (images.py), tiled VAE (tiling.py), live previews
(preview.py), PNG metadata (png_info.py), A1111's inpainting: mask blur, crop, fill, overlay
(inpainting.py), and ControlNet control maps: the sd-webui-controlnet extension's weight-free
preprocessors and resize modes (control.py)."""

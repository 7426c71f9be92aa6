"""Stable Diffusion runtime: torch-free denoising loop over engine folders."""

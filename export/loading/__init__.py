"""Checkpoints in and out of the reference networks, as three modules:

    read.py   presets, diffusers folders and single-file checkpoints -> `LoadedModel` (`load_model`,
              `random_model`); every component loaded strictly, `CheckpointError` naming the keys
    infer.py  the architecture from the tensors: a single file split into its networks, and the
              `ModelSpec` its shapes imply (`split_single_file`, `infer_spec`)
    save.py   a `LoadedModel` written as a diffusers folder or a single file (`save_diffusers`,
              `save_single_file`)

The public names are re-exported here: `from export.loading import load_model, save_diffusers`.
"""

from export.loading.read import CheckpointError, LoadedModel, load_model, random_model
from export.loading.save import save_diffusers, save_single_file

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "load_model",
    "random_model",
    "save_diffusers",
    "save_single_file",
]

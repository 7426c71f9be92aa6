"""Save a loaded model (export/loading/read.py `LoadedModel`) as a diffusers folder
(`save_diffusers`) or as one single-file checkpoint in the original CompVis / Stability layout
(`save_single_file`). Both write next to the target and move into place at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from export import convert_ldm
from export.convert_ldm import CheckpointError
from export.loading.infer import StateDict
from export.loading.read import TOKENIZER_FILES, LoadedModel

__all__ = [
    "save_diffusers",
    "save_single_file",
]

DIFFUSERS_VERSION = "0.42.1"  # written into configs; the layout is that of diffusers 0.42


def _tensors(state_dict: StateDict, fp16: bool) -> StateDict:
    dtype = torch.float16 if fp16 else torch.float32
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_diffusers(model: LoadedModel, out_dir: str | Path, fp16: bool = False) -> Path:
    """Write `model` as a diffusers folder (`StableDiffusionPipeline.from_pretrained` reads it; SDXL:
    `StableDiffusionXLPipeline`, with text_encoder_2/ and tokenizer_2/ too):
    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/. `fp16` stores float16
    weights (loading upcasts them again). The folder is assembled next to `out_dir` and moved into
    place at the end; an existing `out_dir` must be empty or a diffusers folder, which is replaced."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise CheckpointError(f"{out}: exists and is not a diffusers folder; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        _write_diffusers(model, stage, fp16)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return out


def _model_index(spec: Any, scheduler: str) -> dict[str, Any]:
    """model_index.json: StableDiffusion[Inpaint]Pipeline's components, or for SDXL those of
    StableDiffusionXL[Inpaint]Pipeline (stabilityai/stable-diffusion-xl-base-1.0 model_index.json:
    text_encoder_2 / tokenizer_2, force_zeros_for_empty_prompt, no safety checker)."""
    inpaint = "Inpaint" if spec.family.endswith("-inpaint") else ""
    index: dict[str, Any] = {"_diffusers_version": DIFFUSERS_VERSION, "scheduler": ["diffusers", scheduler],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "unet": ["diffusers", "UNet2DConditionModel"],
                             "vae": ["diffusers", spec.vae.to_dict()["_class_name"]]}
    if spec.text_encoder_2 is None:
        return {"_class_name": f"StableDiffusion{inpaint}Pipeline", **index, "feature_extractor": [None, None],
                "requires_safety_checker": False, "safety_checker": [None, None]}
    return {"_class_name": f"StableDiffusionXL{inpaint}Pipeline", **index,
            "force_zeros_for_empty_prompt": spec.force_zeros_for_empty_prompt,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"]}


def _write_text_encoder_2(model: LoadedModel, out: Path, fp16: bool, meta: dict[str, str]) -> None:
    """SDXL's text_encoder_2 (transformers' CLIPTextModelWithProjection: its state dict keys are the
    file's) and tokenizer_2."""
    config = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
              **model.spec.text_encoder_2, "torch_dtype": "float16" if fp16 else "float32"}
    _write_json(out / "text_encoder_2" / "config.json", config)
    safetensors.torch.save_file(_tensors(model.text_encoder_2.state_dict(), fp16),
                                str(out / "text_encoder_2" / "model.safetensors"), metadata=meta)
    (out / "tokenizer_2").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(model.tokenizer_2_dir) / name, out / "tokenizer_2" / name)


def _write_diffusers(model: LoadedModel, out: Path, fp16: bool) -> None:
    spec = model.spec
    scheduler = {"_class_name": "PNDMScheduler", **spec.scheduler, "_diffusers_version": DIFFUSERS_VERSION}
    _write_json(out / "model_index.json", _model_index(spec, scheduler["_class_name"]))
    meta = {"format": "pt"}  # transformers refuses safetensors without it
    if model.text_encoder_2 is not None:
        _write_text_encoder_2(model, out, fp16, meta)
    for name, module, config in (("unet", model.unet, spec.unet), ("vae", model.vae, spec.vae)):
        _write_json(out / name / "config.json", {**config.to_dict(), "_diffusers_version": DIFFUSERS_VERSION})
        weights = out / name / "diffusion_pytorch_model.safetensors"
        safetensors.torch.save_file(_tensors(module.state_dict(), fp16), str(weights), metadata=meta)
    text_config = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        **spec.text_encoder,
        "torch_dtype": "float16" if fp16 else "float32",
    }
    _write_json(out / "text_encoder" / "config.json", text_config)
    text_sd = convert_ldm.clip_to_file(model.text_encoder.state_dict())
    safetensors.torch.save_file(_tensors(text_sd, fp16), str(out / "text_encoder" / "model.safetensors"), metadata=meta)
    (out / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(model.tokenizer_dir) / name, out / "tokenizer" / name)
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler)


def to_single_file_state_dict(model: LoadedModel) -> StateDict:
    """The model's weights in the original LDM layout (what `save_single_file` writes)."""
    if getattr(model.spec.vae, "kind", None) == "tiny":
        raise CheckpointError("an LDM single file holds a KL autoencoder; this model's VAE is an AutoencoderTiny "
                              "(TAESD): save it as a diffusers folder (save_diffusers) instead")
    out: StateDict = {}
    out.update({convert_ldm.UNET_PREFIX + k: v for k, v in convert_ldm.unet_to_ldm(model.unet.state_dict()).items()})
    out.update({convert_ldm.VAE_PREFIX + k: v for k, v in convert_ldm.vae_to_ldm(model.vae.state_dict()).items()})
    text = model.text_encoder.state_dict()
    if model.spec.family.startswith("sd1"):
        out.update({convert_ldm.CLIP_PREFIX + k: v for k, v in convert_ldm.clip_to_file(text).items()})
    else:
        out.update({convert_ldm.OPENCLIP_PREFIX + k: v for k, v in convert_ldm.openclip_to_ldm(text).items()})
    return out


def save_single_file(model: LoadedModel, path: str | Path) -> Path:
    """Write one `.safetensors` file in the original CompVis / Stability layout (SD 1.x text encoder
    under cond_stage_model.transformer., SD 2.x in the OpenCLIP layout under cond_stage_model.model.)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: save_single_file writes .safetensors only")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        safetensors.torch.save_file(_tensors(to_single_file_state_dict(model), fp16=False), str(partial),
                                    metadata={"format": "pt"})
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path

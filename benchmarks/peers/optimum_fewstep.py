"""The few-step scenarios of benchmarks/fewstep.py for the optimum-intel peer (FastSD CPU's recipe),
run by benchmarks/peers/optimum_worker.py (task kinds "fewstep_prepare" and "fewstep") with the
optimum venv's Python.

fewstep_prepare  export a diffusers folder with optimum (`OVStableDiffusionPipeline` for the
    Turbo-style folder, `OVLatentConsistencyModelPipeline` for the LCM one; optimum's default export)
    to `ov_dir`; then `ov_tiny_dir`, the same IR with the tiny VAE as its VAE decoder, as FastSD CPU
    does (it swaps in deinferno/taesd-openvino, an IR of diffusers' AutoencoderTiny made with optimum's
    VaeDecoder export config): here the IR of the tiny folder's own `AutoencoderTiny` decoder
    (`openvino.convert_model`, input `latent_sample`, output `sample`, like optimum's VAE decoder),
    with that VAE's config.json (scaling_factor 1.0). optimum cannot export the tiny folder itself:
    its VAE encoder export reads `latent_dist`, which AutoencoderTiny's encode does not return.
    Both folders also get `tokenizer/openvino_tokenizer.xml` (openvino_tokenizers.convert_tokenizer),
    which the openvino.genai peer (benchmarks/peers/genai_worker.py) reads.
fewstep  load one of those folders, static-reshape to the benchmarked size at batch 1 (the U-Net at
    batch 1: optimum's reshape doubles the U-Net batch for guidance unless the graph takes
    `timestep_cond`, and the Turbo-style image runs at guidance 0, one batch), compile, and time the
    image end to end with seconds per stage (text encoder, U-Net call, VAE decode).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.protocol import StageClock, link_tree, per_call, save_image, time_runs

# optimum's pipeline class per scenario kind ("sdxl": benchmarks/peers/optimum_sdxl.py)
PIPELINES = {"turbo": "OVStableDiffusionPipeline", "lcm": "OVLatentConsistencyModelPipeline",
             "sdxl": "OVStableDiffusionXLPipeline"}


def _tokenizer_ir(folder: Path, name: str = "tokenizer") -> str:
    """Write NAME/openvino_tokenizer.xml with openvino_tokenizers.convert_tokenizer when absent."""
    target = folder / name / "openvino_tokenizer.xml"
    if target.is_file():
        return "present (written by optimum's export)"
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    tokenizer = convert_tokenizer(AutoTokenizer.from_pretrained(str(folder / name)), with_detokenizer=False)
    ov.save_model(tokenizer, str(target))
    return "openvino_tokenizers.convert_tokenizer"


def _taesd_decoder(tiny_vae_dir: Path, out: Path) -> None:
    """The AutoencoderTiny decoder (diffusers' decode: [-1, 1] output) as IR in `out`."""
    import openvino as ov
    import torch
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny.from_pretrained(str(tiny_vae_dir), torch_dtype=torch.float32, local_files_only=True).eval()

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latent_sample, return_dict=False)[0]

    with torch.no_grad():
        model = ov.convert_model(Decode(), example_input=torch.zeros(1, vae.config.latent_channels, 64, 64))
    model.inputs[0].get_tensor().set_names({"latent_sample"})
    model.outputs[0].get_tensor().set_names({"sample"})
    model.reshape({model.inputs[0]: ov.PartialShape([-1, vae.config.latent_channels, -1, -1])})
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out / "openvino_model.xml"), compress_to_fp16=False)
    shutil.copy2(tiny_vae_dir / "config.json", out / "config.json")


def prepare(task: dict[str, Any]) -> dict[str, Any]:
    import optimum.intel

    ov_dir, tiny_dir = Path(task["ov_dir"]), Path(task["ov_tiny_dir"])
    info: dict[str, Any] = {}
    if not (ov_dir / "model_index.json").is_file():
        partial = ov_dir.with_name(ov_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        t0 = time.perf_counter()
        pipe = getattr(optimum.intel, PIPELINES[task["scenario_kind"]]).from_pretrained(
            task["diffusers_dir"], export=True, compile=False, local_files_only=True)
        pipe.save_pretrained(partial)
        del pipe
        info["tokenizer_ir"] = _tokenizer_ir(partial)
        partial.replace(ov_dir)
        info["export_s"] = time.perf_counter() - t0
    if not (tiny_dir / "model_index.json").is_file():
        partial = tiny_dir.with_name(tiny_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        link_tree(ov_dir, partial, skip=("vae_decoder", "model_index.json"))
        _taesd_decoder(Path(task["tiny_vae_dir"]), partial / "vae_decoder")
        shutil.copy2(ov_dir / "model_index.json", partial / "model_index.json")
        partial.replace(tiny_dir)
    info["scheduler"] = _sync_scheduler(Path(task["diffusers_dir"]), (ov_dir, tiny_dir))
    return info


def _sync_scheduler(source: Path, folders: tuple[Path, ...]) -> str:
    """The source folder's scheduler in each IR folder: optimum saves the scheduler class model_index.json
    names with that class's keys, which for a folder whose model_index.json still says PNDMScheduler (the
    Turbo folders of older caches) is not the trailing Euler its scheduler_config.json asks for.
    Idempotent, so it also repairs folders exported before."""
    config = (source / "scheduler" / "scheduler_config.json").read_text()
    name = json.loads(config)["_class_name"]
    for folder in folders:
        target = folder / "scheduler" / "scheduler_config.json"
        if target.read_text() != config:
            target.unlink()  # a hard link shared with the other folder: replaced, not written through
            target.write_text(config)
        index = json.loads((folder / "model_index.json").read_text())
        if index["scheduler"][1] != name:
            (folder / "model_index.json").unlink()
            (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", name]}, indent=2))
    return name


def _unet_batch_one(pipe) -> None:
    """Reshape the U-Net's batch axis to 1 (guidance off: one batch per step): every input but the
    timestep ([1] already) is batched (SDXL's text_embeds and time_ids too)."""
    model = pipe.unet.model
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if port.get_any_name() != "timestep":
            shape[0] = 1
        shapes[port] = shape
    model.reshape(shapes)


def load(task: dict[str, Any], ov_config: dict[str, str]):
    import diffusers
    import optimum.intel

    res = task["resolution"]
    t0 = time.perf_counter()
    cls = getattr(optimum.intel, PIPELINES[task["scenario_kind"]])
    pipe = cls.from_pretrained(task["ov_dir"], compile=False, local_files_only=True, ov_config=ov_config)
    # the scheduler its scheduler_config.json names (prepare copies the source folder's), as the runtime reads it
    config = json.loads((Path(task["ov_dir"]) / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    pipe.reshape(batch_size=1, height=res, width=res, num_images_per_prompt=1)
    if task["guidance_scale"] <= 1:  # optimum's reshape doubled the batch for guidance (but for timestep_cond)
        _unet_batch_one(pipe)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    return pipe, time.perf_counter() - t0


def run(task: dict[str, Any], ov_config: dict[str, str]) -> dict[str, Any]:
    import torch

    pipe, load_s = load(task, ov_config)
    clock = StageClock()
    clock.wrap(pipe.text_encoder, "forward", "text_encoder")
    clock.wrap(pipe.unet, "forward", "unet")
    clock.wrap(pipe.vae_decoder, "forward", "vae_decode")
    latents = torch.from_numpy(np.load(task["latents_path"]))
    res = task["resolution"]

    def once():
        clock.start()
        out = pipe(task["prompt"], height=res, width=res, num_inference_steps=task["steps"],
                   guidance_scale=task["guidance_scale"], latents=latents.clone(), output_type="np")
        return out, per_call(clock.take(), "unet")

    out, stats = time_runs(once, task)
    save_image(task, out.images)
    vae_config = json.loads((Path(task["ov_dir"]) / "vae_decoder" / "config.json").read_text())
    info = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
            "vae_decoder": vae_config.get("_class_name"), "ov_config": ov_config,
            "unet_compiled_precision": str(pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")),
            "unet_inputs": {i.get_any_name(): str(i.get_partial_shape()) for i in pipe.unet.model.inputs}}
    return {"load_s": load_s, "e2e": stats, "info": info}

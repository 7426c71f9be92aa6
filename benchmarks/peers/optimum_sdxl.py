"""The SDXL benchmark (benchmarks/sdxl.py) for the optimum-intel peer, run by
benchmarks/peers/optimum_worker.py (task kinds "sdxl_prepare" and "sdxl") with the optimum venv's Python.

sdxl_prepare  export the diffusers folder with `OVStableDiffusionXLPipeline.from_pretrained(...,
    export=True, load_in_8bit=False)` to `ov_dir`: fp32 IR. Without `load_in_8bit=False` optimum
    compresses the weights of every submodel over 1 B parameters (the SDXL U-Net) to int8
    (optimum/exporters/openvino/__main__.py `_apply_model_size_based_quantization`), which would
    compare another precision. Both tokenizers get their `openvino_tokenizer.xml` (the openvino.genai
    peer reads them). Then `ov_turbo_dir`: the same files hard-linked, but a scheduler config with
    trailing timesteps (the Turbo-style scenario; openvino.genai reads the scheduler from the folder).
sdxl  load `ov_dir` (benchmarks/peers/optimum_fewstep.py `load`: the folder's scheduler, static reshape
    to the scenario's size at batch 1, the U-Net at batch 1 when guidance is off, compile), then:
    scenario "unet" times one U-Net call at batch 2 on the suite's feeds (timestep int64 [1], as the
    pipeline passes it); "e2e" times the image end to end from the suite's latents
    (benchmarks/protocol.py time_e2e).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peers.optimum_fewstep import _sync_scheduler, _tokenizer_ir, load
from benchmarks.protocol import link_tree, precision_name, save_image, time_e2e, time_network


def _export(diffusers_dir: str, ov_dir: Path) -> dict[str, Any]:
    from optimum.intel import OVStableDiffusionXLPipeline

    partial = ov_dir.with_name(ov_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    pipe = OVStableDiffusionXLPipeline.from_pretrained(diffusers_dir, export=True, compile=False, local_files_only=True,
                                                       load_in_8bit=False)
    pipe.save_pretrained(partial)
    del pipe
    gc.collect()
    tokenizers = {name: _tokenizer_ir(partial, name) for name in ("tokenizer", "tokenizer_2")}
    partial.replace(ov_dir)
    return {"export_s": time.perf_counter() - t0, "tokenizer_ir": tokenizers, "weights": "fp32 (load_in_8bit=False)"}


def _turbo_view(ov_dir: Path, turbo_dir: Path) -> None:
    """`ov_dir` hard-linked into `turbo_dir`, with trailing timestep spacing in its scheduler config."""
    partial = turbo_dir.with_name(turbo_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    link_tree(ov_dir, partial, skip=("scheduler",))
    config = json.loads((ov_dir / "scheduler" / "scheduler_config.json").read_text())
    (partial / "scheduler").mkdir(parents=True)
    (partial / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**config, "timestep_spacing": "trailing"}, indent=2))
    shutil.rmtree(turbo_dir, ignore_errors=True)
    partial.replace(turbo_dir)


def prepare(task: dict[str, Any]) -> dict[str, Any]:
    ov_dir, turbo_dir = Path(task["ov_dir"]), Path(task["ov_turbo_dir"])
    info: dict[str, Any] = {"reused": (ov_dir / "model_index.json").is_file()}
    if not info["reused"]:
        info.update(_export(task["diffusers_dir"], ov_dir))
    info["scheduler"] = _sync_scheduler(Path(task["diffusers_dir"]), (ov_dir,))
    config = json.loads((ov_dir / "scheduler" / "scheduler_config.json").read_text())
    turbo_config = turbo_dir / "scheduler" / "scheduler_config.json"
    if not turbo_config.is_file() or json.loads(turbo_config.read_text()) != {**config, "timestep_spacing": "trailing"}:
        _turbo_view(ov_dir, turbo_dir)
    info["ov_dir_bytes"] = sum(p.stat().st_size for p in ov_dir.rglob("*") if p.is_file())
    return info


def _unet_call(pipe, feeds: dict[str, np.ndarray]):
    import torch

    f = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    timestep = torch.from_numpy(feeds["timestep"][:1].astype(np.int64))
    return lambda: pipe.unet(f["sample"], timestep, f["encoder_hidden_states"], text_embeds=f["text_embeds"],
                             time_ids=f["time_ids"])[0]


def run(task: dict[str, Any], ov_config: dict[str, str]) -> dict[str, Any]:
    import torch

    unet_only = task["scenario"]["kind"] == "unet"
    pipe, load_s = load(task, ov_config)  # the U-Net scenario's guidance is on: batch 2
    precision = precision_name(pipe.unet.request.get_property("INFERENCE_PRECISION_HINT"))
    info = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "ov_config": ov_config,
            "unet_inputs": {i.get_any_name(): str(i.get_partial_shape()) for i in pipe.unet.model.inputs}}
    if unet_only:
        with np.load(task["feeds_path"]) as data:
            feeds = {k: data[k] for k in data.files}
        _, stats = time_network(_unet_call(pipe, feeds), feeds, task, batch=2, load_s=load_s)
        return {"unet": stats, "precision": precision, "info": info}
    latents, res = torch.from_numpy(np.load(task["latents_path"])), task["resolution"]

    def once(n: int):
        return pipe(task["prompt"], height=res, width=res, num_inference_steps=n, guidance_scale=task["guidance_scale"],
                    latents=latents.clone(), output_type="np")

    out, stats = time_e2e(once, task)
    save_image(task, out.images)
    return {"e2e": stats, "load_s": load_s, "precision": precision, "info": info}

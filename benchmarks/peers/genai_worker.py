"""The openvino.genai peer, run with the optimum venv's Python (benchmarks/peers/setup-optimum.sh
installs `openvino-genai` and `openvino-tokenizers` there, at the project's OpenVINO version):
`.venv-optimum/bin/python -m benchmarks.peers.genai_worker TASK.json RESULT.json`.

Task kind `fewstep` (benchmarks/fewstep.py): `openvino_genai.Text2ImagePipeline` on the IR folder that
optimum exports (benchmarks/peers/optimum_fewstep.py, which adds `tokenizer/openvino_tokenizer.xml`
from openvino_tokenizers.convert_tokenizer; the tiny-VAE folder has the AutoencoderTiny decoder as
its vae_decoder). The pipeline is static-reshaped (`reshape(1, res, res, guidance_scale)`) and
compiled for the CPU, then the image is timed end to end; seconds per stage come from genai's own
`ImageGenerationPerfMetrics` (text encoder, U-Net mean per call, VAE decode; milliseconds there).

Initial noise: a `openvino_genai.Generator` subclass hands the suite's latents to the first
`randn_tensor` call of the latent shape, so the Turbo-style image starts from the same noise as the
other targets (image PSNR); later draws (LCM's re-noising between steps) are NumPy normals.
`precision` "default" leaves the CPU plugin to choose (bf16 where the CPU has it); "f32" compiles
with INFERENCE_PRECISION_HINT f32. Imports numpy, openvino, openvino_genai and benchmarks.protocol.

Task kind `sdxl` (benchmarks/sdxl.py): the same pipeline on optimum's SDXL IR (its Turbo-style view
for the trailing-timestep scenario), end to end; or genai's `UNet2DConditionModel` alone for the U-Net
call at batch 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.protocol import finish, precision_name, save_image, serve, time_e2e, time_network, time_runs, versions

PACKAGES = ("openvino-genai", "openvino-tokenizers", "openvino", "numpy")


def _generator(latents: np.ndarray, seed: int):
    import openvino as ov
    import openvino_genai

    class SuiteLatents(openvino_genai.Generator):
        """The suite's latents for the first draw of their shape, NumPy normals after."""

        def __init__(self) -> None:
            openvino_genai.Generator.__init__(self)
            self.rng = np.random.default_rng(seed)
            self.first = True

        def next(self) -> float:
            return float(self.rng.standard_normal())

        def randn_tensor(self, shape) -> Any:
            shape = tuple(int(d) for d in shape)
            if self.first and shape == latents.shape:
                self.first = False
                return ov.Tensor(np.ascontiguousarray(latents, np.float32))
            return ov.Tensor(self.rng.standard_normal(shape, dtype=np.float32))

    return SuiteLatents()


def _ms(value: Any) -> float:
    """A genai metric in ms: a number, or a MeanStdPair (its mean: per call)."""
    return float(value.mean) if hasattr(value, "mean") else float(value)


def _stages(metrics: Any, steps: int) -> dict[str, float]:
    """Seconds per stage of the last generate() from genai's ImageGenerationPerfMetrics (ms there):
    the text encoders' inference summed, the U-Net's mean per call, the VAE decode."""
    text = metrics.get_text_encoder_infer_duration()
    text_ms = sum(_ms(v) for v in text.values()) if hasattr(text, "values") else _ms(text)
    return {"text_encoder": text_ms / 1e3, "unet": _ms(metrics.get_unet_infer_duration()) / 1e3, "unet_calls": steps,
            "vae_decode": _ms(metrics.get_vae_decoder_infer_duration()) / 1e3,
            "generate": _ms(metrics.get_generate_duration()) / 1e3}


def _compile_config(task: dict[str, Any]) -> dict[str, str]:
    """CPU compile properties for the task's precision: "f32" pins f32, "default" leaves the plugin's choice."""
    return {"INFERENCE_PRECISION_HINT": "f32"} if task["precision"] == "f32" else {}


def _pipeline(task: dict[str, Any], config: dict[str, str]) -> tuple[Any, float]:
    """Text2ImagePipeline on `ov_dir`, static-reshaped to one image at the task's size and guidance,
    compiled for the CPU: (pipe, load seconds)."""
    import openvino_genai

    res = task["resolution"]
    t0 = time.perf_counter()
    pipe = openvino_genai.Text2ImagePipeline(task["ov_dir"])
    pipe.reshape(1, res, res, task["guidance_scale"])
    pipe.compile("CPU", **config)
    return pipe, time.perf_counter() - t0


def fewstep(task: dict[str, Any]) -> dict[str, Any]:
    res, steps = task["resolution"], task["steps"]
    config = _compile_config(task)
    pipe, load_s = _pipeline(task, config)
    latents = np.load(task["latents_path"])

    def run():
        image = pipe.generate(task["prompt"], width=res, height=res, num_inference_steps=steps,
                              guidance_scale=task["guidance_scale"], num_images_per_prompt=1,
                              generator=_generator(latents, task["seed"]))
        return image, _stages(pipe.get_performance_metrics(), steps)

    out, stats = time_runs(run, task)
    save_image(task, np.asarray(out.data, np.float32) / 255.0)
    info = {"pipeline": "openvino_genai.Text2ImagePipeline", "compile_config": config,
            "versions": versions(PACKAGES),
            "unet_note": "genai's own metrics: U-Net inference time over the steps; text encoder and VAE decode "
                         "likewise; `generate` is genai's whole generate() duration"}
    stats["stages_spread"] = {k: [min(r[k] for r in stats["stage_runs"]), max(r[k] for r in stats["stage_runs"])]
                              for k in stats["stages"] if k != "unet_calls"}
    return {"load_s": load_s, "e2e": stats, "info": info}


def _sdxl_unet(task: dict[str, Any], config: dict[str, str]) -> tuple[dict[str, Any], float]:
    """One call of genai's own UNet2DConditionModel (the pipeline's U-Net wrapper) on the suite's
    batch-2 feeds: reshaped to batch 2 at the task's size, the hidden states set once, then
    `infer(sample, timestep)` (timestep int64 [1], as the pipeline passes it). (stats, load seconds)"""
    import openvino as ov
    import openvino_genai

    res = task["resolution"]
    with np.load(task["feeds_path"]) as data:
        feeds = {k: data[k] for k in data.files}
    t0 = time.perf_counter()
    unet = openvino_genai.UNet2DConditionModel(str(Path(task["ov_dir"]) / "unet"))
    unet.reshape(2, res, res, int(feeds["encoder_hidden_states"].shape[1]))
    unet.compile("CPU", **config)
    load_s = time.perf_counter() - t0
    for name in ("encoder_hidden_states", "text_embeds", "time_ids"):
        unet.set_hidden_states(name, ov.Tensor(np.ascontiguousarray(feeds[name])))
    sample, timestep = ov.Tensor(feeds["sample"]), ov.Tensor(feeds["timestep"][:1].astype(np.int64))
    return time_network(lambda: unet.infer(sample, timestep), feeds, task, batch=2, load_s=load_s)[1], load_s


def sdxl(task: dict[str, Any]) -> dict[str, Any]:
    """benchmarks/sdxl.py: scenario "unet" (genai's U-Net wrapper alone) or "e2e" (the pipeline from the
    suite's latents, benchmarks/protocol.py time_e2e, with genai's stage metrics of the last run)."""
    import openvino as ov

    config = _compile_config(task)
    precision = precision_name(config.get("INFERENCE_PRECISION_HINT")
                               or ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    info = {"pipeline": "openvino_genai.Text2ImagePipeline", "compile_config": config, "versions": versions(PACKAGES)}
    if task["scenario"]["kind"] == "unet":
        stats, _ = _sdxl_unet(task, config)
        return {"unet": stats, "precision": precision, "info": {**info, "unet": "openvino_genai.UNet2DConditionModel"}}
    pipe, load_s = _pipeline(task, config)
    latents, res = np.load(task["latents_path"]), task["resolution"]

    def run(n: int):
        return pipe.generate(task["prompt"], width=res, height=res, num_inference_steps=n,
                             guidance_scale=task["guidance_scale"], num_images_per_prompt=1,
                             generator=_generator(latents, task["seed"]))

    out, stats = time_e2e(run, task)
    stats["stages"] = _stages(pipe.get_performance_metrics(), task["steps"])
    save_image(task, np.asarray(out.data, np.float32) / 255.0)
    return {"e2e": stats, "load_s": load_s, "precision": precision, "info": info}


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"target": task.get("target"), "status": "ok"}
    t0 = time.perf_counter()
    kinds = {"fewstep": fewstep, "sdxl": sdxl}
    if task["kind"] not in kinds:
        raise ValueError(f"unknown task kind {task['kind']!r} for the openvino.genai peer")
    result.update(kinds[task["kind"]](task))
    return finish(result, t0)


def main(argv: list[str] | None = None) -> int:
    return serve(run_task, "benchmarks.peers.genai_worker", argv)


if __name__ == "__main__":
    sys.exit(main())

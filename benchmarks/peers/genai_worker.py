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
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from benchmarks.protocol import finish, save_image, serve, time_runs, versions

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


def fewstep(task: dict[str, Any]) -> dict[str, Any]:
    import openvino_genai

    res, steps = task["resolution"], task["steps"]
    config = {"INFERENCE_PRECISION_HINT": "f32"} if task["precision"] == "f32" else {}
    t0 = time.perf_counter()
    pipe = openvino_genai.Text2ImagePipeline(task["ov_dir"])
    pipe.reshape(1, res, res, task["guidance_scale"])
    pipe.compile("CPU", **config)
    load_s = time.perf_counter() - t0
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


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"target": task.get("target"), "status": "ok"}
    t0 = time.perf_counter()
    if task["kind"] != "fewstep":
        raise ValueError(f"unknown task kind {task['kind']!r} for the openvino.genai peer")
    result.update(fewstep(task))
    return finish(result, t0)


def main(argv: list[str] | None = None) -> int:
    return serve(run_task, "benchmarks.peers.genai_worker", argv)


if __name__ == "__main__":
    sys.exit(main())

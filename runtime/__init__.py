"""Stable Diffusion runtime: torch-free denoising loop over engine folders.

    import runtime
    with runtime.load("engines/sd15") as pipe:     # best available backend; pipe.backend says which
        result = pipe.txt2img("a watercolor fox", seed=1)
        result.images[0].save("fox.png")

`load`, `Pipeline`, `GenerationResult`, `Request` and the errors are imported on first use, so
`import runtime.folder.networks` (as export/ does) stays light.
"""

_LAZY = {
    "load": "runtime.pipeline", "Pipeline": "runtime.pipeline", "GenerationResult": "runtime.pipeline",
    "GenerationCancelled": "runtime.pipeline", "Request": "runtime.request", "HiresFix": "runtime.hires",
    "SDRuntimeError": "runtime.errors", "PipelineError": "runtime.errors", "ManifestError": "runtime.errors",
    "BackendError": "runtime.errors", "EngineLoadError": "runtime.errors", "EngineInputError": "runtime.errors",
    "EngineRunError": "runtime.errors", "EngineClosedError": "runtime.errors", "ImageInputError": "runtime.errors",
    "IntegrityError": "runtime.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

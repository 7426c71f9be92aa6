"""Stable Diffusion runtime: torch-free denoising loop over engine folders.

    import runtime
    pipe = runtime.load("engines/sd15")            # best available backend; pipe.backend says which
    result = pipe.txt2img("a watercolor fox", seed=1)
    result.images[0].save("fox.png")

`load`, `Pipeline` and `GenerationResult` are imported on first use, so `import runtime.networks`
(as export/ does) stays light.
"""

_LAZY = ("load", "Pipeline", "GenerationResult", "PipelineError")


def __getattr__(name: str):
    if name in _LAZY:
        from runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

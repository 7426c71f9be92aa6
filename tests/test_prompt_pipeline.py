"""The ecosystem features wired into the pipeline (issue 17): A1111 prompt syntax at run time (an
unweighted prompt encodes exactly as before; a weighted one as runtime/text/prompt_syntax.py computes it,
which tests/test_prompt_syntax.py checks against A1111's own rules), and tiled VAE decoding."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.text import prompt_syntax as ps
from runtime.text import tokens as text
from runtime.compare import psnr
from runtime.families import TextEncoding

FAST = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_engine):
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as p:
        yield p


def test_unweighted_prompts_encode_exactly_as_before(pipe):
    for prompt in ("a red circle on a blue background", "a photo, 35mm, f/1.8: sharp", "x " * 90):
        a1111 = pipe.txt2img(prompt, seed=4, **FAST).images
        literal = pipe.txt2img(prompt, seed=4, prompt_syntax="none", **FAST).images
        np.testing.assert_array_equal(a1111, literal)


def test_weighted_prompts_take_the_a1111_path(pipe):
    prompt, negative = "a (red:1.4) circle [on] a ((blue)) background BREAK stars", "blurry"
    weighted = pipe.txt2img(prompt, negative_prompt=negative, seed=4, **FAST)
    literal = pipe.txt2img(prompt, negative_prompt=negative, seed=4, prompt_syntax="none", **FAST)
    assert not np.array_equal(weighted.images, literal.images)
    assert literal.parameters["prompt_syntax"] == "none" and "prompt_syntax" not in weighted.parameters
    # the conditioning the pipeline fed is A1111's weighting of the text encoder's output
    te, tok = pipe.engines["text_encoder"], pipe.tokenizer
    n = max(ps.count_chunks(tok, t) for t in (prompt, negative))
    ids, w = ps.tokenize_weighted(tok, [prompt], n)
    assert n == 2 and w.max() == pytest.approx(1.4) and w.min() == pytest.approx(1 / 1.1)
    expected = ps.apply_weights(text.encode(te, ids), w)
    from runtime import stages

    request = pipe.request("txt2img", prompt, negative_prompt=negative)
    assert request.prompt_chunks == 2
    np.testing.assert_array_equal(request.tokens.cond, ids)
    np.testing.assert_array_equal(request.tokens.cond_weights, w)
    got = stages.encode_prompt([(te, TextEncoding("text_encoder"))], request.tokens, images_per_prompt=1, max_length=77)
    np.testing.assert_array_equal(got.cond, expected)


def test_bad_prompt_syntax_option(pipe):
    with pytest.raises(runtime.PipelineError, match="prompt_syntax must be one of a1111, none"):
        pipe.txt2img("a cat", prompt_syntax="compel", **FAST)


def test_tiled_vae_decode_through_the_pipeline(pipe):
    whole = pipe.txt2img("a red circle", seed=2, height=128, width=128, **FAST)
    tiled = pipe.txt2img("a red circle", seed=2, height=128, width=128, vae_tiling=64, **FAST)
    assert tiled.parameters["vae_tile"] == 64 // pipe.vae_scale_factor and "vae_tile" not in whole.parameters
    assert tiled.images.shape == whole.images.shape
    # the random tiny VAE's GroupNorm and attention see one tile, not the image (runtime/imaging/tiling.py):
    # close, not equal
    assert 15 < psnr(tiled.images, whole.images) < 100
    odd = 4 * pipe.vae_scale_factor + 1
    with pytest.raises(runtime.PipelineError, match=f"vae_tiling: a tile of {odd} pixels must be a multiple of "
                                                    f"{pipe.vae_scale_factor}"):
        pipe.txt2img("a red circle", vae_tiling=odd, **FAST)

"""A request is prepared once and carried (issue 24): one generation, from Python or over HTTP,
tokenizes each of its texts once, builds its sampler schedule once and estimates its memory once;
the stages and the wire adapters consume what the request carries."""

from __future__ import annotations

from collections import Counter

import pytest

from runtime import memory
from runtime import scheduler as sch
from runtime.text import prompt_syntax as ps
from runtime.text import tokens
from test_serve_support import LiveServer, sd1_pipe  # noqa: F401

STEPS = 2


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Counts of the three preparations: a text's BPE pass (plain and A1111-weighted), a schedule
    build, a memory estimate."""
    seen: Counter = Counter()

    def spy(owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            seen[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    spy(tokens, "token_ids")
    spy(ps, "weighted_token_chunks")
    spy(sch, "make_schedule")
    spy(memory.MemoryModel, "estimate")
    return seen


def test_the_pipeline_has_a_memory_model(sd1_pipe):
    assert sd1_pipe.limits.memory is not None  # else the estimate count below would prove nothing


def test_python_api_prepares_once(sd1_pipe, calls):
    sd1_pipe.txt2img("a red circle", negative_prompt="blurry", num_inference_steps=STEPS, seed=1, progress=False)
    assert calls == {"token_ids": 2, "make_schedule": 1, "estimate": 1}  # two texts, one BPE pass each
    calls.clear()
    sd1_pipe.txt2img("a (red:1.3) circle", negative_prompt="blurry", num_inference_steps=STEPS, seed=1,
                     progress=False)
    assert calls["weighted_token_chunks"] == 2 and calls["make_schedule"] == 1 and calls["estimate"] == 1
    calls.clear()
    sd1_pipe.txt2img("a red circle", guidance_scale=1.0, num_inference_steps=STEPS, seed=1, progress=False)
    assert calls == {"token_ids": 1, "make_schedule": 1, "estimate": 1}  # unguided: no negative prompt


def test_a_batch_of_requests_prepares_each_once(sd1_pipe, calls):
    requests = [sd1_pipe.request("txt2img", p, num_inference_steps=STEPS, seed=s) for p, s in (("a cat", 1),
                                                                                              ("a dog", 2))]
    assert calls == {"token_ids": 4, "make_schedule": 2, "estimate": 2}
    sd1_pipe.generate(requests, progress=False)
    # generating re-does none of it; the batch as a whole is estimated once more (it must fit too)
    assert calls == {"token_ids": 4, "make_schedule": 2, "estimate": 3}


@pytest.mark.parametrize("path, body", [
    ("/sdapi/v1/txt2img", {"prompt": "a red circle", "negative_prompt": "blurry", "steps": STEPS, "seed": 3,
                           "width": 64, "height": 64}),
    ("/v1/images/generations", {"prompt": "a red circle", "size": "64x64",
                                "sd_runtime": {"steps": STEPS, "seed": 3, "negative_prompt": "blurry"}}),
])
def test_http_prepares_once(sd1_pipe, calls, path, body):
    server = LiveServer(sd1_pipe)
    try:
        r = server.post(path, body)
    finally:
        server.stop()
    assert r.status_code == 200, r.text[:300]
    assert calls == {"token_ids": 2, "make_schedule": 1, "estimate": 1}

"""Prompt styles (issue 28; runtime/text/styles.py): A1111 v1.10's styles.csv and its rule
(modules/styles.py `merge_prompts`, applied in order to prompt and negative prompt) re-derived here,
through the server (`serve --styles`, `styles` in txt2img, GET /sdapi/v1/prompt-styles) and the
unchanged `webuiapi` client."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import PipelineError
from runtime.serving import server as serve_cli
from runtime.text.styles import StyleBook
from test_serve_support import LiveServer, as_array, pixels, sd1_pipe  # noqa: F401

webuiapi = pytest.importorskip("webuiapi", reason="the dev extra installs webuiapi")

STEPS = 3
SETTINGS = dict(num_inference_steps=STEPS, guidance_scale=7.0, height=64, width=64, progress=False)
# A BOM, spaces after the commas, a quoted field with commas, a comment row and an empty line
CSV = ('\ufeffname, prompt, negative_prompt\n'
       'watercolor, "{prompt}, watercolor painting, soft", "photo"\n'
       '# not a style, x, y\n'
       '\n'
       'sharp, sharp focus  , blurry\n'
       'empty, ,\n'
       'frame, "a frame around {prompt} and {prompt}", \n')


def a1111_rule(prompt: str, style_texts: list[str]) -> str:
    """Each style in turn: '{prompt}' in it is replaced by the text so far; else the stripped text so
    far and the stripped style joined by ', ', leaving out an empty one."""
    for text in style_texts:
        if "{prompt}" in text:
            prompt = text.replace("{prompt}", prompt)
        else:
            prompt = ", ".join([t for t in (prompt.strip(), text.strip()) if t != ""])
    return prompt


ROWS = {"watercolor": ("{prompt}, watercolor painting, soft", "photo"), "sharp": ("sharp focus  ", "blurry"),
        "empty": ("", ""), "frame": ("a frame around {prompt} and {prompt}", "")}


@pytest.fixture(scope="module")
def styles_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("styles") / "styles.csv"
    path.write_text(CSV, encoding="utf-8")
    return path


def test_the_file_reads_as_a1111s(styles_file, tmp_path):
    book = StyleBook.load(styles_file)
    assert {n: (s.prompt, s.negative_prompt) for n, s in book.styles.items()} == ROWS
    old = tmp_path / "old.csv"  # A1111's older "name, text" columns
    old.write_text("name,text\nink,ink drawing\n", encoding="utf-8")
    assert StyleBook.load(old).apply("a cat", "", ["ink"]) == ("a cat, ink drawing", "")
    bad = tmp_path / "bad.csv"
    bad.write_text("title,words\nx,y\n", encoding="utf-8")
    with pytest.raises(ValueError, match="name, prompt"):
        StyleBook.load(bad)


@pytest.mark.parametrize("names", [["watercolor"], ["sharp", "watercolor"], ["watercolor", "sharp", "frame"],
                                   ["empty", "sharp"], []])
@pytest.mark.parametrize("prompt, negative", [("a fox ", "ugly"), ("", "")])
def test_apply_follows_a1111s_rule(styles_file, names, prompt, negative):
    got = StyleBook.load(styles_file).apply(prompt, negative, names)
    assert got == (a1111_rule(prompt, [ROWS[n][0] for n in names]), a1111_rule(negative, [ROWS[n][1] for n in names]))


def test_unknown_style_names_the_known_ones(styles_file):
    with pytest.raises(PipelineError, match="unknown style.*'oil'.*'watercolor', 'sharp', 'empty', 'frame'") as e:
        StyleBook.load(styles_file).apply("a", "", ["sharp", "oil"])
    assert e.value.field == "styles"


def test_serve_styles_option(styles_file, tmp_path, capsys):
    args = serve_cli.build_parser().parse_args(["folder", "--styles", str(styles_file)])
    assert serve_cli.config_from_args(args).styles == str(styles_file)
    assert serve_cli.main([str(tmp_path / "no-folder"), "--styles", str(tmp_path / "missing.csv")]) == 2
    assert "styles file" in capsys.readouterr().err


# --- through the server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def styled(sd1_pipe, styles_file):
    live = LiveServer(sd1_pipe, styles=str(styles_file))
    yield live
    live.stop()


def test_prompt_styles_endpoint(styled):
    got = styled.get("/sdapi/v1/prompt-styles").json()
    assert got == [{"name": n, "prompt": p, "negative_prompt": q} for n, (p, q) in ROWS.items()]
    api = webuiapi.WebUIApi(host="127.0.0.1", port=styled.port)
    assert [s["name"] for s in api.get_prompt_styles()] == list(ROWS)


def test_http_styles_equal_the_python_api_on_the_styled_prompt(styled, sd1_pipe):
    names = ["sharp", "watercolor"]
    body = dict(prompt="a fox", negative_prompt="ugly", styles=names, seed=4, steps=STEPS, cfg_scale=7.0, width=64,
                height=64, sampler_name="Euler")
    r = styled.post("/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    prompt, negative = a1111_rule("a fox", [ROWS[n][0] for n in names]), a1111_rule("ugly", [ROWS[n][1] for n in names])
    assert (info["all_prompts"], info["all_negative_prompts"], info["styles"]) == ([prompt], [negative], names)
    assert info["infotexts"][0].startswith(f"{prompt}\nNegative prompt: {negative}\n")
    want = sd1_pipe.txt2img(prompt, negative_prompt=negative, seed=4, scheduler="euler", karras=False, **SETTINGS)
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), as_array(want.images[0]))


def test_http_unknown_style_is_a_422_naming_styles(styled):
    r = styled.post("/sdapi/v1/txt2img", {"prompt": "a", "styles": ["oil"], "steps": STEPS, "width": 64, "height": 64})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("styles: unknown style(s) 'oil'") and "'watercolor'" in r.json()["detail"]


def test_a_server_without_a_styles_file_refuses_styles(sd1_pipe):
    live = LiveServer(sd1_pipe)
    try:
        r = live.post("/sdapi/v1/txt2img", {"prompt": "a", "styles": ["sharp"], "steps": STEPS, "width": 64,
                                            "height": 64})
        assert r.status_code == 422 and "styles: this server has no styles file" in r.json()["detail"]
        assert "serve --styles FILE" in r.json()["detail"]
        assert live.get("/sdapi/v1/prompt-styles").json() == []
    finally:
        live.stop()

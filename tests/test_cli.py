"""`python -m runtime` / `sd-generate`: PNGs whose metadata reproduces them; one-line errors, exit 2."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime
from runtime.cli import main, read_metadata

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_txt2img_png_metadata_round_trips(tiny_sd1_engine, tmp_path, capsys):
    out = tmp_path / "barn.png"
    rc, stdout, stderr = _run_cli(["txt2img", tiny_sd1_engine, "a red barn", "--negative-prompt", "blurry",
                                   "--steps", 3, "--seed", 7, "--scheduler", "euler", "--guidance", 6.5,
                                   "--backend", "onnxruntime", "-o", out, "--no-progress"], capsys)
    assert rc == 0, stderr
    assert f"wrote {out}" in stdout and "seed 7" in stdout and "timings: " in stdout and "total" in stdout
    meta = read_metadata(out)
    assert meta["prompt"] == "a red barn" and meta["negative_prompt"] == "blurry"
    assert (meta["seed"], meta["steps"], meta["scheduler"], meta["guidance_scale"]) == (7, 3, "euler", 6.5)
    assert meta["backend"] == "onnxruntime" and meta["engine"] == str(tiny_sd1_engine)
    with Image.open(out) as im:
        assert im.text["seed"] == "7" and im.text["prompt"] == "a red barn" and im.text["scheduler"] == "euler"
        assert im.text["size"] == f"{meta['width']}x{meta['height']}"
        pixels = np.asarray(im.convert("RGB"))
    # the metadata reproduces the image through the API
    pipe = runtime.load(meta["engine"], backend=meta["backend"])
    again = pipe.txt2img(meta["prompt"], negative_prompt=meta["negative_prompt"], num_inference_steps=meta["steps"],
                         guidance_scale=meta["guidance_scale"], scheduler=meta["scheduler"], seed=meta["seed"],
                         height=meta["height"], width=meta["width"], progress=False)
    np.testing.assert_array_equal(np.asarray(again.images[0]), pixels)
    # ... and through the command line it stores
    out2 = tmp_path / "again.png"
    argv = shlex.split(meta["command"])[1:] + ["-o", str(out2), "--no-progress"]
    assert _run_cli(argv, capsys)[0] == 0
    with Image.open(out2) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), pixels)


def test_img2img_and_inpaint_write_strength(tiny_sd1_engine, tmp_path, capsys):
    pipe = runtime.load(tiny_sd1_engine, backend="onnxruntime")
    h, w = pipe.default_size
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image)
    m = np.zeros((h, w), np.uint8)
    m[: h // 2] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "i2i.png"
    rc, _, err = _run_cli(["img2img", tiny_sd1_engine, "snow", "--image", image, "--strength", 0.5, "--steps", 4,
                           "--seed", 1, "-o", out, "--no-progress", "--backend", "onnxruntime"], capsys)
    assert rc == 0, err
    meta = read_metadata(out)
    assert meta["strength"] == 0.5 and meta["image"] == str(image) and meta["mode"] == "img2img"
    out = tmp_path / "inp.png"
    rc, stdout, err = _run_cli(["inpaint", tiny_sd1_engine, "a door", "--image", image, "--mask", mask, "--steps", 2,
                                "--seed", 2, "--num-images", 2, "-o", out, "--no-progress",
                                "--backend", "onnxruntime"], capsys)
    assert rc == 0, err
    metas = [read_metadata(tmp_path / f"inp-{i}.png") for i in range(2)]
    assert [m["seed"] for m in metas] == [2, 3] and metas[0]["strength"] == 1.0 and metas[0]["mask"] == str(mask)
    assert "vae_encode" in stdout


def _one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("sd-generate: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_errors_exit_2_one_line(tiny_sd1_engine, tmp_path, capsys):
    rc, _, err = _run_cli(["txt2img", tmp_path / "missing", "x"], capsys)
    _one_line_error(rc, err, "does not exist")
    rc, _, err = _run_cli(["txt2img", tiny_sd1_engine, "x", "--height", 63, "--width", 64, "--no-progress",
                           "-o", tmp_path / "never.png"], capsys)
    _one_line_error(rc, err, "multiples of the VAE scale factor")
    rc, _, err = _run_cli(["inpaint", tiny_sd1_engine, "x", "--image", tmp_path / "nope.png"], capsys)
    _one_line_error(rc, err, "inpaint needs --mask")
    rc, _, err = _run_cli(["img2img", tiny_sd1_engine, "x", "--image", tmp_path / "nope.png"], capsys)
    _one_line_error(rc, err, "nope.png does not exist")
    rc, _, err = _run_cli(["img2img", tiny_sd1_engine, "x"], capsys)
    _one_line_error(rc, err, "img2img needs --image")
    with pytest.raises(SystemExit) as e:
        main(["paint", str(tiny_sd1_engine), "x"])
    _, err = capsys.readouterr()
    _one_line_error(e.value.code, err, "invalid choice: 'paint'")


def test_python_m_runtime_empty_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runtime", "txt2img", str(tmp_path), "a cat"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    _one_line_error(proc.returncode, proc.stderr, "no manifest.json")

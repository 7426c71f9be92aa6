"""A1111 `parameters` PNG chunk (runtime/imaging/png_info.py), sampler names (runtime/sampling/names.py) and
`sd-generate --from-png` (runtime/cli.py).

Independent references: the PyPI `sd-parsers` package (its AUTOMATIC1111 parser) reads what we
write; A1111's own documented infotext (the docstring of `parse_generation_parameters`,
modules/infotext_utils.py, v1.10) and its sampler tables (modules/sd_samplers_kdiffusion.py,
sd_samplers_timesteps.py, sd_samplers_lcm.py, sd_schedulers.py) give the expected values below.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from runtime.imaging import png_info
from runtime.sampling import names as sampler_names
from runtime.cli import main, read_metadata, save_png

PARAMS = {"mode": "txt2img", "prompt": "a red barn, snow", "negative_prompt": "blurry", "steps": 20,
          "scheduler": "dpmpp_2m_karras", "karras": None, "guidance_scale": 7.5, "guidance_rescale": 0.0,
          "eta": 0.0, "height": 768, "width": 512, "seeds": [42, 43]}


# --- writing ----------------------------------------------------------------------------------

def test_infotext_format():
    sha256 = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
    text = png_info.infotext_from_parameters(PARAMS, model_hash=sha256, model_name="v1-5-pruned-emaonly")
    assert text == ("a red barn, snow\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, "
                    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: sd-runtime 0.1.0")
    # img2img: strength as "Denoising strength"; DDIM's eta as "Eta DDIM"; values with ',' or ':' quoted
    params = {**PARAMS, "mode": "img2img", "strength": 0.6, "scheduler": "ddim", "eta": 0.3, "negative_prompt": "",
              "guidance_rescale": 0.7}
    text = png_info.infotext_from_parameters(params, seed=43, model_name="my: model, v2")
    assert text == ("a red barn, snow\n"  # no negative prompt: no line for it
                    "Steps: 20, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.5, Seed: 43, Size: 512x768, "
                    'Model: "my: model, v2", Denoising strength: 0.6, Eta DDIM: 0.3, CFG Rescale: 0.7, '
                    "Version: sd-runtime 0.1.0")
    with pytest.raises(ValueError, match="one prompt"):
        png_info.infotext_from_parameters({**PARAMS, "prompt": ["a", "b"]})


# --- reading ----------------------------------------------------------------------------------

A1111_DOC_EXAMPLE = (  # parse_generation_parameters' docstring
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, "
    "mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")


def test_parse_a1111_documented_example():
    fields = png_info.parse_infotext(A1111_DOC_EXAMPLE)
    assert fields["Prompt"].startswith("girl with an artist's beret") and fields["Prompt"].endswith("intricate")
    assert fields["Negative prompt"].startswith("ugly, fat") and fields["Negative prompt"].endswith("messy drawing")
    assert {k: v for k, v in fields.items() if k not in ("Prompt", "Negative prompt")} == {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size-1": "512", "Size-2": "512",
        "Model hash": "45dee52b"}
    settings, ignored = png_info.settings_from_fields(fields)
    assert settings == {"prompt": fields["Prompt"], "negative_prompt": fields["Negative prompt"], "steps": 20,
                        "guidance_scale": 7.0, "seed": 965400086, "width": 512, "height": 512,
                        "scheduler": "euler_a", "karras": False, "model": "? [45dee52b]"}
    assert ignored == []


def test_parse_quoted_multiline_and_missing_negative():
    text = ('line one, (red:1.2)\nline two\n'
            'Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 5.5, Seed: 7, Size: 640x448, '
            'Lora hashes: "detail: 1a2b3c, style: 4d5e6f", Clip skip: 1, Hires upscale: 2')
    fields = png_info.parse_infotext(text)
    assert fields["Prompt"] == "line one, (red:1.2)\nline two" and fields["Negative prompt"] == ""
    assert fields["Lora hashes"] == "detail: 1a2b3c, style: 4d5e6f"  # quoted, with ',' and ':' inside
    settings, ignored = png_info.settings_from_fields(fields)
    assert (settings["width"], settings["height"]) == (640, 448)  # Size is width x height
    assert (settings["scheduler"], settings["karras"]) == ("dpmpp_2m", True)  # legacy name with the schedule
    # "Clip skip: 1" is A1111's default and changes nothing; the others cannot be honoured
    assert ignored == ["Lora hashes: detail: 1a2b3c, style: 4d5e6f", "Hires upscale: 2"]
    # a multi-line negative prompt; a last line with fewer than 3 "Key: value" pairs is prompt text
    fields = png_info.parse_infotext("cat\nNegative prompt: dog\n  and bird  \nnote: a, b\n"
                                     "Steps: 5, Seed: 1, CFG scale: 3")
    assert fields["Prompt"] == "cat" and fields["Negative prompt"] == "dog\nand bird\nnote: a, b"
    fields = png_info.parse_infotext("just a prompt\nSteps: 5, Seed: 1")
    assert fields == {"Prompt": "just a prompt\nSteps: 5, Seed: 1", "Negative prompt": ""}
    # quote / unquote as A1111
    assert png_info.quote("plain") == "plain" and png_info.quote('a, "b"') == '"a, \\"b\\""'
    assert png_info.unquote('"a, \\"b\\""') == 'a, "b"' and png_info.unquote('"broken') == '"broken'
    with pytest.raises(ValueError, match="Steps"):
        png_info.settings_from_fields({"Steps": "twenty"})


@pytest.mark.parametrize("prompt, negative", [("", ""), ("snow: deep, white\n\nwind", "x:y, z"),
                                              ("ein Fuchs im Schnee – 狐", "")])
def test_round_trip(prompt, negative, tmp_path):
    params = {**PARAMS, "prompt": prompt, "negative_prompt": negative}
    text = png_info.infotext_from_parameters(params)
    path = tmp_path / "a.png"
    save_png(Image.new("RGB", (8, 8)), path, {"prompt": prompt}, text)
    with Image.open(path) as im:
        assert im.text[png_info.PARAMETERS_KEY] == text
    fields = png_info.parse_infotext(text)
    # blank lines inside the prompt are kept; A1111 strips each line's ends
    assert fields["Prompt"] == prompt and fields["Negative prompt"] == negative
    settings, _ = png_info.settings_from_fields(fields)
    assert (settings["steps"], settings["guidance_scale"], settings["seed"]) == (20, 7.5, 42)


# --- sampler names ----------------------------------------------------------------------------

@pytest.mark.parametrize("ours, karras, a1111", [
    ("euler_a", False, ("Euler a", "Automatic")), ("euler", False, ("Euler", "Automatic")),
    ("euler", True, ("Euler", "Karras")), ("lms", True, ("LMS", "Karras")), ("heun", False, ("Heun", "Automatic")),
    # A1111 v1.9+: DPM++ 2M's "Automatic" schedule is Karras, so uniform sigmas are named
    ("dpmpp_2m", False, ("DPM++ 2M", "Uniform")), ("dpmpp_2m", True, ("DPM++ 2M", "Karras")),
    ("dpmpp_2m_karras", False, ("DPM++ 2M", "Karras")),
    ("ddim", False, ("DDIM", "Automatic")), ("pndm", False, ("PLMS", "Automatic")),
    ("unipc", False, ("UniPC", "Automatic")), ("lcm", False, ("LCM", "Automatic")),
    ("ddpm", False, ("DDPM", "Automatic")),
])
def test_sampler_names_both_ways(ours, karras, a1111):
    assert sampler_names.to_a1111(ours, karras) == a1111
    back = sampler_names.from_a1111(*a1111)
    assert back == (("dpmpp_2m", True) if ours == "dpmpp_2m_karras" else (ours, karras))


@pytest.mark.parametrize("name, schedule, expected", [
    ("DPM++ 2M Karras", None, ("dpmpp_2m", True)),   # before v1.9: the schedule in the name
    ("DPM++ 2M", None, ("dpmpp_2m", False)),         # before v1.9: plain DPM++ 2M was uniform
    ("DPM++ 2M", "Automatic", ("dpmpp_2m", True)),   # v1.9+: its default schedule is Karras
    ("LMS Karras", None, ("lms", True)), ("Euler a", "Automatic", ("euler_a", False)),
    ("Euler", "karras", ("euler", True)),            # internal schedule name accepted too
    ("k_euler_a", None, ("euler_a", False)), ("k_dpmpp_2m_ka", None, ("dpmpp_2m", True)),
    ("plms", None, ("pndm", False)),
    ("DDIM", "Karras", ("ddim", False)),             # A1111's DDIM ignores the schedule type
])
def test_sampler_names_from_a1111(name, schedule, expected):
    assert sampler_names.from_a1111(name, schedule) == expected


def test_sampler_names_unsupported():
    with pytest.raises(sampler_names.SamplerNameError, match="DPM\\+\\+ SDE"):
        sampler_names.from_a1111("DPM++ SDE Karras")
    with pytest.raises(sampler_names.SamplerNameError, match="Exponential"):
        sampler_names.from_a1111("Euler", "Exponential")
    with pytest.raises(sampler_names.SamplerNameError, match="no A1111 name"):
        sampler_names.to_a1111("dpm_fast", False)
    from runtime.scheduler import SAMPLERS

    assert {s.ours for s in sampler_names.A1111_SAMPLERS} | {"dpmpp_2m_karras"} == set(SAMPLERS)
    assert "DPM++ 2M" in sampler_names.sampler_names() and len(sampler_names.sampler_names()) == 11


# --- the command line -------------------------------------------------------------------------

def _cli(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def barn(tiny_sd1_engine, tmp_path_factory):
    """A PNG written by the CLI: txt2img on the tiny-sd1 engine, ONNX Runtime."""
    out = tmp_path_factory.mktemp("png") / "barn.png"
    rc = main(["txt2img", str(tiny_sd1_engine), "a red barn, (snow:1.2)", "--negative-prompt", "blurry, dark",
               "--steps", "3", "--seed", "7", "--scheduler", "euler", "--guidance", "6.5", "--backend", "onnxruntime",
               "-o", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_cli_png_parses_with_sd_parsers(barn, tiny_sd1_engine):
    from sd_parsers import ParserManager

    from runtime.folder.manifest import load_manifest

    info = ParserManager().parse(str(barn))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert sampler.name == "Euler" and sampler.parameters["scheduler"] == "Automatic"
    params = sampler.parameters
    assert (params["steps"], params["seed"], params["cfg_scale"]) == ("3", "7", "6.5")
    assert [p.value for p in sampler.prompts] == ["a red barn, (snow:1.2)"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry, dark"]
    source = load_manifest(tiny_sd1_engine).source
    assert sampler.model.name == "tiny-sd1" and sampler.model.hash == source["sha256"][:10]
    assert info.metadata["Size"] == "64x64"
    # and with ours; our own chunks are still there
    with Image.open(barn) as im:
        fields = png_info.parse_infotext(im.text[png_info.PARAMETERS_KEY])
    settings, ignored = png_info.settings_from_fields(fields)
    assert ignored == []
    meta = read_metadata(barn)
    for key in ("prompt", "negative_prompt", "steps", "guidance_scale", "seed", "width", "height", "scheduler"):
        assert settings[key] == meta[key], key


def test_from_png_reproduces_bit_identically(barn, tmp_path, capsys):
    again = tmp_path / "again.png"
    rc, out, err = _cli(["--from-png", barn, "-o", again, "--no-progress"], capsys)
    assert rc == 0, err
    assert "sd-runtime metadata" in out
    np.testing.assert_array_equal(_pixels(again), _pixels(barn))
    assert read_metadata(again)["command"] == read_metadata(barn)["command"]
    # flags given override the PNG
    more = tmp_path / "more.png"
    rc, _, err = _cli(["--from-png", barn, "--steps", 4, "-o", more, "--no-progress"], capsys)
    assert rc == 0, err
    meta = read_metadata(more)
    assert meta["steps"] == 4 and meta["seed"] == 7 and meta["prompt"] == "a red barn, (snow:1.2)"
    assert not np.array_equal(_pixels(more), _pixels(barn))


def test_from_png_a1111_only(barn, tiny_sd1_engine, tmp_path, capsys):
    """A PNG with only the A1111 chunk (as A1111 writes it): the engine folder is given, the rest
    comes from the infotext, and the image is the same as ours bit for bit."""
    with Image.open(barn) as im:
        infotext = im.text[png_info.PARAMETERS_KEY]
        pixels = np.asarray(im.convert("RGB"))
    a1111 = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text(png_info.PARAMETERS_KEY, infotext + ", Clip skip: 2, ENSD: 31337")
    Image.fromarray(pixels).save(a1111, pnginfo=info)

    rc, _, err = _cli(["--from-png", a1111, "-o", tmp_path / "never.png"], capsys)
    assert rc == 2 and "names no engine folder" in err and "tiny-sd1" in err
    out = tmp_path / "from_a1111.png"
    rc, stdout, err = _cli(["txt2img", tiny_sd1_engine, "--from-png", a1111, "--backend", "onnxruntime", "-o", out,
                            "--no-progress"], capsys)
    assert rc == 0, err
    assert "A1111 parameters metadata" in stdout and "not applied" in err and "Clip skip: 2; ENSD: 31337" in err
    np.testing.assert_array_equal(_pixels(out), pixels)


def test_from_png_errors(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    rc, _, err = _cli(["--from-png", plain], capsys)
    assert rc == 2 and "neither sd-runtime nor A1111 parameters" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(["--from-png", tmp_path / "missing.png"], capsys)
    assert rc == 2 and "does not exist" in err
    rc, _, err = _cli([], capsys)
    assert rc == 2 and "COMMAND, ENGINE_DIR and PROMPT are required" in err

"""Textual inversion added at build time (export/embeddings.py, `build-engine --embedding FILE[:TOKEN]`)
and expanded at run time (runtime.text.tokens.expand_embeddings).

Reference: diffusers' `load_textual_inversion` on the same tiny model (its tokenizer, its grown
embedding table, its `maybe_convert_prompt`), same latents. Files in the three formats: A1111 `.pt`
(string_to_param), A1111 `.safetensors` (emb_params) and diffusers' {token: vectors}; single- and
multi-vector. Images: PSNR over float images in [0, 1], >= 60 dB required and, as for all fp32
tiny-model parity here, >= 90 dB reached (tests/test_pipeline_parity.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import runtime
from export.build import build_engine
from export.embeddings import EmbeddingError, EmbeddingSpec, apply_embeddings, embedding_specs, read_embedding
from export.loading.read import random_model
from export.loading.save import save_diffusers
from psnr_bounds import MIN_PSNR_DB, PARITY_PSNR_DB
from runtime.compare import psnr
from runtime.folder.manifest import load_manifest
from runtime.text.tokens import expand_embeddings, load_tokenizer, token_ids

log = logging.getLogger(__name__)

STEPS = 3
SMALL = {"min_image": 32, "opt_image": 64, "max_image": 64, "max_batch": 2}
FIRST_NEW_ID = 49408  # the CLIP BPE vocabulary has ids 0..49407 (export/assets/clip-bpe)
# the new tokens in the order of the --embedding arguments, which is the order of their ids
NEW_TOKENS = ["tiny-one", "<tiny-multi>", "<tiny-multi>_1", "<tiny-multi>_2", "<tiny-diff>", "<tiny-diff>_1"]
PROMPTS = [  # (prompt, negative prompt)
    ("a photo of tiny-one on a table", "blurry"),
    ("a <tiny-multi> painting of a lighthouse, <tiny-diff>", "<tiny-multi>, low quality"),
]

diffusers = pytest.importorskip("diffusers")


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return 0.5 * torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path: Path, vectors: torch.Tensor) -> Path:
    """As stable-diffusion-webui's textual_inversion.py saves an embedding."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 500,
                "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny"}, str(path))
    return path


def write_a1111_safetensors(path: Path, vectors: torch.Tensor) -> Path:
    safetensors.torch.save_file({"emb_params": vectors.contiguous()}, str(path))
    return path


def write_diffusers(path: Path, token: str, vectors: torch.Tensor) -> Path:
    """As diffusers' textual_inversion training script saves learned_embeds.safetensors."""
    safetensors.torch.save_file({token: vectors.contiguous()}, str(path))
    return path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """tiny-sd1 as a diffusers folder, three embedding files and the engine folder built with them:
    tiny-one (A1111 .pt, 1 vector, token from the file stem), <tiny-multi> (A1111 .safetensors,
    3 vectors), <tiny-diff> (diffusers format stored as <cat-toy>, 2 vectors)."""
    root = tmp_path_factory.mktemp("embeddings")
    model = random_model("tiny-sd1", seed=0)
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    folder = save_diffusers(model, root / "diffusers")
    files = {
        "tiny-one": write_a1111_pt(root / "tiny-one.pt", _vectors(1, width, 1)),
        "<tiny-multi>": write_a1111_safetensors(root / "multi.safetensors", _vectors(3, width, 2)),
        "<tiny-diff>": write_diffusers(root / "learned_embeds.safetensors", "<cat-toy>", _vectors(2, width, 3)),
    }
    args = [files["tiny-one"], f"{files['<tiny-multi>']}:<tiny-multi>", (files["<tiny-diff>"], "<tiny-diff>")]
    engine = build_engine(str(folder), root / "engine", embeddings=args, progress=lambda line: None, **SMALL)
    return {"root": root, "folder": folder, "files": files, "engine": engine, "width": width}


def _diffusers_pipe(folder: Path, files: dict[str, Path] | None):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = diffusers.DDIMScheduler.from_config(base)
    for token, path in (files or {}).items():
        pipe.load_textual_inversion(str(path), token=token)
    return pipe


@pytest.fixture(scope="module")
def reference(sd1):
    return _diffusers_pipe(sd1["folder"], sd1["files"])


def test_tokens_and_ids_match_diffusers(sd1, reference):
    manifest = load_manifest(sd1["engine"])
    table = manifest.tokenizer["embeddings"]
    assert table == {"tiny-one": ["tiny-one"], "<tiny-multi>": ["<tiny-multi>", "<tiny-multi>_1", "<tiny-multi>_2"],
                     "<tiny-diff>": ["<tiny-diff>", "<tiny-diff>_1"]}
    tokenizer = load_tokenizer(sd1["engine"] / "tokenizer", manifest.tokenizer["pad_token"])  # as the runtime loads it
    assert tokenizer.convert_tokens_to_ids(NEW_TOKENS) == list(range(FIRST_NEW_ID, FIRST_NEW_ID + 6))
    assert reference.tokenizer.convert_tokens_to_ids(NEW_TOKENS) == list(range(FIRST_NEW_ID, FIRST_NEW_ID + 6))
    for prompt, negative in PROMPTS:
        for text in (prompt, negative):
            expanded = expand_embeddings(text, table)
            assert expanded == reference.maybe_convert_prompt(text, reference.tokenizer)
            want = reference.tokenizer(expanded, add_special_tokens=False)["input_ids"]
            assert token_ids(tokenizer, expanded) == want
    assert token_ids(tokenizer, expand_embeddings("<tiny-multi>", table)) == [49409, 49410, 49411]


def test_text_encoder_table_matches_the_files(sd1, reference):
    """The rows diffusers wrote into its grown table are the files' vectors (the reference holds them)."""
    rows = reference.text_encoder.get_input_embeddings().weight.detach()
    assert rows.shape[0] == FIRST_NEW_ID + 6
    torch.testing.assert_close(rows[FIRST_NEW_ID + 1: FIRST_NEW_ID + 4], read_embedding(sd1["files"]["<tiny-multi>"]))
    encoder = runtime.load(sd1["engine"], backend="onnxruntime").engines["text_encoder"]
    ids = np.full((1, 77), 49407, np.int32)
    ids[0, :8] = [49406, 320, 49408, 49409, 49410, 49411, 49412, 49413]
    ours = encoder.run({"input_ids": ids})["last_hidden_state"]
    with torch.no_grad():
        ref = reference.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", range(len(PROMPTS)))
def test_images_match_diffusers_load_textual_inversion(sd1, reference, which):
    prompt, negative = PROMPTS[which]
    pipe = runtime.load(sd1["engine"], backend="onnxruntime")
    table = load_manifest(sd1["engine"]).tokenizer["embeddings"]
    h, w = pipe.default_size
    f = pipe.vae_scale_factor
    latents = np.random.default_rng(11 + which).standard_normal((1, 4, h // f, w // f), dtype=np.float32)

    def ours(p: str, n: str) -> np.ndarray:
        return pipe.txt2img(p, negative_prompt=n, latents=latents, num_inference_steps=STEPS, guidance_scale=7.5,
                            scheduler="ddim", output_type="np", progress=False).images

    got = ours(prompt, negative)  # the pipeline expands the multi-vector names itself (runtime/stages.py)
    ref = reference(prompt, negative_prompt=negative, latents=torch.from_numpy(latents), num_inference_steps=STEPS,
                    guidance_scale=7.5, output_type="np", height=h, width=w).images
    value = psnr(got, ref)
    plain = _diffusers_pipe(sd1["folder"], None)(prompt, negative_prompt=negative, latents=torch.from_numpy(latents),
                                                  num_inference_steps=STEPS, guidance_scale=7.5, output_type="np",
                                                  height=h, width=w).images
    moved = psnr(ref, plain)
    log.info("PSNR textual inversion %r vs diffusers: %.1f dB (without the embeddings: %.1f dB)", prompt, value, moved)
    assert value >= PARITY_PSNR_DB, f"{prompt!r}: PSNR {value:.1f} dB"
    assert moved < MIN_PSNR_DB, "the embeddings barely change the image: the comparison cannot tell"
    if which == 1:  # without the expansion only the first of each multi-vector embedding is seen
        from runtime import stages

        assert stages.expand_prompts([prompt], table) != [prompt]  # the expansion is what the pipeline did


def test_manifest_records_each_embedding(sd1):
    manifest = load_manifest(sd1["engine"])
    files = sd1["files"]
    assert manifest.source["embeddings"] == [
        {"file": p.name, "path": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
         "token": token, "vectors": n}
        for (token, p), n in zip(files.items(), (1, 3, 2))]
    config = json.loads((sd1["engine"] / "tokenizer" / "tokenizer_config.json").read_text())
    added = {int(k): v["content"] for k, v in config["added_tokens_decoder"].items() if int(k) >= FIRST_NEW_ID}
    assert added == dict(enumerate(NEW_TOKENS, FIRST_NEW_ID))
    assert "loras" not in manifest.source


def test_changed_token_rebuilds(sd1, monkeypatch):
    import export.build

    class Rebuild(Exception):
        pass

    monkeypatch.setattr(export.build, "_build_into", lambda *a, **k: (_ for _ in ()).throw(Rebuild()))
    files, lines = sd1["files"], []
    same = [files["tiny-one"], (files["<tiny-multi>"], "<tiny-multi>"), f"{files['<tiny-diff>']}:<tiny-diff>"]
    build_engine(str(sd1["folder"]), sd1["engine"], embeddings=same, progress=lines.append, **SMALL)
    assert any(line.startswith("up to date") for line in lines)
    with pytest.raises(Rebuild):
        build_engine(str(sd1["folder"]), sd1["engine"], embeddings=[*same[:2], (files["<tiny-diff>"], "<other>")],
                     progress=lines.append, **SMALL)
    assert "the source differs (embeddings" in lines[-1]


def test_sd2_tokenizer_keeps_its_padding_and_text_encoder_matches_diffusers(tmp_path):
    """SD 2.x pads with "!" (id 0); the added tokens must not disturb that. Text-encoder level parity."""
    model = random_model("tiny-sd2", seed=0)
    folder = save_diffusers(model, tmp_path / "diffusers")
    path = write_a1111_safetensors(tmp_path / "style2.safetensors", _vectors(2, 32, 7))
    model = apply_embeddings(model, [EmbeddingSpec(path, "style2")])
    tokenizer = load_tokenizer(model.tokenizer_dir, "!")
    assert tokenizer.pad_token_id == 0 and tokenizer.convert_tokens_to_ids(["style2", "style2_1"]) == [49408, 49409]
    pipe = _diffusers_pipe(folder, {"style2": path})
    ids = torch.tensor([[49406, 49408, 49409, 1929, 49407] + [0] * 72])
    with torch.no_grad():
        torch.testing.assert_close(model.text_encoder(ids)[0], pipe.text_encoder(ids)[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- expansion (runtime)


def test_expand_embeddings_rules():
    table = {"<s>": ["<s>", "<s>_1", "<s>_2"], "one": ["one"], "Mixed": ["Mixed", "Mixed_1"]}
    assert expand_embeddings("a <s> cat", table) == "a <s> <s>_1 <s>_2 cat"
    assert expand_embeddings("a <S>,<s>", table) == "a <s> <s>_1 <s>_2,<s> <s>_1 <s>_2"  # case-insensitive, glued
    assert expand_embeddings("mixed and MIXED", table) == "Mixed Mixed_1 and Mixed Mixed_1"
    assert expand_embeddings("a literal <s>_1 stays", table) == "a literal <s>_1 stays"  # the longer token wins
    assert expand_embeddings("one two", table) == "one two"
    assert expand_embeddings("a <s> cat", {}) == "a <s> cat"
    assert expand_embeddings("plain", {"one": ["one"]}) == "plain"


def test_embeddings_used_finds_names_as_expansion_does():
    """The names a prompt uses (what a refiner taking over must have too): case-insensitive, a
    multi-vector name's own tokens count as the name, none in a prompt without them."""
    from runtime.text.tokens import embeddings_used

    table = {"<s>": ["<s>", "<s>_1", "<s>_2"], "one": ["one"], "Mixed": ["Mixed", "Mixed_1"]}
    assert embeddings_used(["a <S> cat", "MIXED_1 x"], table) == ("<s>", "Mixed")
    assert embeddings_used(["a literal <s>_2"], table) == ("<s>",)
    assert embeddings_used(["someone", "plain"], table) == ("one",)  # matched anywhere, as CLIP's added tokens
    assert embeddings_used(["plain", ""], table) == () and embeddings_used(["a <s>"], {}) == ()


# ------------------------------------------------------------------------------------------- errors


def test_file_formats_and_shapes(tmp_path):
    v = _vectors(2, 32, 0)
    a = read_embedding(write_a1111_pt(tmp_path / "a.pt", v))
    b = read_embedding(write_a1111_safetensors(tmp_path / "b.safetensors", v))
    c = read_embedding(write_diffusers(tmp_path / "c.safetensors", "<c>", v[0]))  # one vector, 1-D
    torch.save({"<d>": v}, str(tmp_path / "learned_embeds.bin"))
    d = read_embedding(tmp_path / "learned_embeds.bin")
    assert torch.equal(a, v) and torch.equal(b, v) and torch.equal(c, v[:1]) and torch.equal(d, v)
    safetensors.torch.save_file({"clip_l": v, "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(EmbeddingError, match="an SDXL embedding"):
        read_embedding(tmp_path / "xl.safetensors")
    safetensors.torch.save_file({"a": v, "b": v.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(EmbeddingError, match="expected one tensor .* found 2: a, b"):
        read_embedding(tmp_path / "two.safetensors")


def test_pickle_with_objects_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("the pickle was executed",))

    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "hook": Boom()}, str(tmp_path / "evil.pt"))
    with pytest.raises(EmbeddingError, match="not loaded for safety"):
        read_embedding(tmp_path / "evil.pt")


def test_other_family_and_token_clashes_are_refused(tmp_path):
    model = random_model("tiny-sd1", seed=0)
    wide = write_a1111_safetensors(tmp_path / "sd15-style.safetensors", _vectors(1, 768, 0))
    with pytest.raises(EmbeddingError, match=r"vectors of width 768, but this sd1 text encoder's width is 32: the "
                                             r"embedding is for another model family"):
        apply_embeddings(model, [EmbeddingSpec(wide, "sd15-style")])
    ok = write_a1111_safetensors(tmp_path / "cat.safetensors", _vectors(2, 32, 0))
    for token in ("cat", "Cat", "<|endoftext|>"):
        with pytest.raises(EmbeddingError, match=rf"token\(s\) {re.escape(token)} already in the tokenizer's vocab"):
            apply_embeddings(model, embedding_specs([f"{ok}:{token}"]))
    with pytest.raises(EmbeddingError, match="share the token"):
        embedding_specs([(ok, "<x>"), (ok, "<X>")])
    with pytest.raises(EmbeddingError, match="one word without spaces"):
        embedding_specs([(ok, "two words")])
    with pytest.raises(EmbeddingError, match="does not exist"):
        embedding_specs([tmp_path / "missing.pt"])
    # a token already added (a model that carries an embedding) is refused too
    first = apply_embeddings(model, [EmbeddingSpec(ok, "<kitty>")])
    with pytest.raises(EmbeddingError, match=r"<kitty>, <kitty>_1 already in"):
        apply_embeddings(first, [EmbeddingSpec(ok, "<kitty>")])

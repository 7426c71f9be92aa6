"""CLIP text encoder (transformers `CLIPTextModel`; SDXL's second, `CLIPTextModelWithProjection`)
built from a config dict, and the CLIP BPE tokenizer files every engine folder carries.

The vocabulary and merges are packaged in export/assets/clip-bpe (openai/CLIP `bpe_simple_vocab_16e6`,
49408 tokens, as open_clip and transformers use it), so nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from runtime.folder.networks import TEXT_MAX_LENGTH

CLIP_BPE_DIR = Path(__file__).resolve().parent / "assets" / "clip-bpe"

BOS_TOKEN = "<|startoftext|>"  # id 49406
EOS_TOKEN = "<|endoftext|>"  # id 49407; also the unknown token (openai/CLIP simple_tokenizer.py)


def build_text_encoder(kwargs: dict[str, Any], projection: bool = False):
    """A randomly initialized `transformers.CLIPTextModel` (with `projection`: a
    `CLIPTextModelWithProjection`, SDXL's `text_encoder_2`) from `CLIPTextConfig` keyword arguments
    (load weights into it afterwards). Returned in eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**kwargs))
    return model.eval()


def write_tokenizer_files(out_dir: str | Path, pad_token: str = EOS_TOKEN) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json so that
    `transformers.CLIPTokenizer.from_pretrained(out_dir)` loads offline, truncates/pads to 77 tokens
    and pads with `pad_token` ("<|endoftext|>" for SD 1.x, "!" for SD 2.x / OpenCLIP)."""
    out = Path(out_dir)
    vocab = json.loads((CLIP_BPE_DIR / "vocab.json").read_text(encoding="utf-8"))
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(CLIP_BPE_DIR / name, out / name)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TEXT_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out

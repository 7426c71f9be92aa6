"""A1111 prompt syntax (runtime/text/prompt_syntax.py) against A1111's own documentation.

References, with the expected values written from them:
- [doctest] the examples in the docstring of `parse_prompt_attention`, AUTOMATIC1111/stable-diffusion-webui
  modules/prompt_parser.py (v1.10.1), float values included;
- [wiki] the A1111 wiki, "Features" page, "Attention/emphasis" cheat sheet and "BREAK keyword"
  ("fills the current chunks with padding characters. Adding more text after BREAK text will start
  a new chunk");
- [hijack] modules/sd_hijack_clip.py `tokenize_line` (chunking, BREAK, comma back-tracking) and
  modules/sd_emphasis.py `EmphasisOriginal` (the mean restoration), transcribed in torch below.
`compel` is no reference here: it parses its own syntax ("(word)1.3", "word++"); given
"a (word:1.3) b" it returns one unweighted fragment "a word:1 . 3 b".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.text import prompt_syntax as ps
from runtime.text import tokens as text

TOKENIZER = Path(__file__).resolve().parents[1] / "export" / "assets" / "tiny" / "tokenizer"
BOS, EOS = 49406, 49407  # CLIP's <|startoftext|>, <|endoftext|> (the tiny model's vocab.json)
# "cat</w>", "dog</w>", "a</w>", ",</w>", "break</w>", "x</w>"
CAT, DOG, A, COMMA, BREAK_WORD, X = 2368, 1929, 320, 267, 2568, 343


@pytest.fixture(scope="module")
def tok():
    return text.load_tokenizer(TOKENIZER)


def _row(ids, pad=EOS):
    """One expected 77-token chunk: BOS + ids + EOS + padding (the SD1 pad token is EOS)."""
    row = [BOS, *ids, EOS]
    return row + [pad] * (77 - len(row))


def _wrow(weights):
    return [1.0, *weights] + [1.0] * (76 - len(weights))


# --- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, expected", [
    # [doctest]
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # [wiki] cheat sheet: (word) x1.1, ((word)) x1.21 (= 1.1 * 1.1), [word] / 1.1, (word:1.5),
    # (word:0.25), \(word\) literal
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.1 * 1.1)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    # [wiki] "Specifying weight only works with () not with []": ':0.5]' is text inside [ ]
    ("[word:0.5]", [("word:0.5", 1 / 1.1)]),
    # escapes: \\ is one backslash (doctest list of accepted tokens); \[ literal
    ("back\\\\slash \\[x\\]", [("back\\slash [x]", 1.0)]),
    # unbalanced closers with nothing open are literal text (the doctest's "anything else")
    ("a) b] c", [("a) b] c", 1.0)]),
    ("[unclosed square", [("unclosed square", 1 / 1.1)]),
    # nesting of both kinds: factors multiply, innermost first
    ("([mixed])", [("mixed", (1 / 1.1) * 1.1)]),
    ("((a:2) b)", [("a", 2.0 * 1.1), (" b", 1.1)]),
    ("", [("", 1.0)]),
])
def test_parse_matches_a1111_documented_examples(prompt, expected):
    assert ps.parse_prompt_attention(prompt) == expected


def test_break_fragments():
    # [wiki] BREAK must be upper case and a word of its own
    assert ps.parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert ps.parse_prompt_attention("a cat break BREAKfast") == [("a cat break BREAKfast", 1.0)]
    # A1111's marker is text to the bracket arithmetic: inside ( ) it is weighted and no longer a break
    assert ps.parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


def test_weight_that_is_not_a_number_is_an_error():
    with pytest.raises(ps.PromptSyntaxError, match="1.2.3"):
        ps.parse_prompt_attention("a (cat:1.2.3)")
    with pytest.raises(ValueError):  # PromptSyntaxError is a PipelineError, a ValueError
        ps.parse_prompt_attention("(cat:.)")


@pytest.mark.parametrize("prompt, weighted", [
    ("a photo of a cat", False), ("", False), ("time: 5pm, ratio 3:2", False), ("BREAKfast", False),
    ("a (cat)", True), ("a [cat]", True), ("a cat BREAK a dog", True), ("(cat:1.0)", True),  # parens dropped
    ("photo \\(35mm\\)", True), ("back\\slash", True),  # A1111 drops a lone backslash
    ("a ) b", False),  # an unmatched closer stays literal
])
def test_has_weighting(prompt, weighted):
    assert ps.has_weighting(prompt) is weighted


# --- token chunks -------------------------------------------------------------------------------

def test_weighted_chunks_fragments_tokenized_separately(tok):
    ids, w = ps.weighted_token_chunks(tok, "a (cat:1.3) [dog]")
    assert ids.dtype == np.int32 and w.dtype == np.float32 and ids.shape == w.shape == (1, 77)
    assert ids[0].tolist() == _row([A, CAT, DOG])
    np.testing.assert_array_equal(w[0], np.float32(_wrow([1.0, 1.3, 1 / 1.1])))


def test_unweighted_prompts_give_todays_ids(tok):
    """No syntax: exactly runtime/text/tokens.py's chunks, short and long, and weights all 1."""
    long = ", ".join(f"word{i}" for i in range(60))  # ~180 tokens: 3 chunks
    for prompt in ("a photo of a cat", "", long):
        ids, w = ps.weighted_token_chunks(tok, prompt)
        np.testing.assert_array_equal(ids, text.tokenize(tok, [prompt])[0])
        assert np.all(w == 1.0)
    batch_ids, batch_w = ps.tokenize_weighted(tok, ["a cat", long], min_chunks=4)
    np.testing.assert_array_equal(batch_ids, text.tokenize(tok, ["a cat", long], min_chunks=4))
    assert batch_w.shape == (2, 4 * 77) and np.all(batch_w == 1.0)


def test_weights_across_a_chunk_boundary(tok):
    """72 unweighted tokens, then 8 at 1.3: positions 73..75 of chunk 0 and 1..5 of chunk 1."""
    prompt = "cat " * 72 + "(dog dog dog dog dog dog dog dog:1.3)"
    ids, w = ps.weighted_token_chunks(tok, prompt)
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == _row([CAT] * 72 + [DOG] * 3)
    assert ids[1].tolist() == _row([DOG] * 5)
    np.testing.assert_array_equal(w[0], np.float32(_wrow([1.0] * 72 + [1.3] * 3)))
    np.testing.assert_array_equal(w[1], np.float32(_wrow([1.3] * 5)))


def test_break_closes_the_chunk(tok):
    # [wiki]: BREAK pads the current chunk, the text after it starts a new one
    ids, w = ps.weighted_token_chunks(tok, "a cat BREAK (dog)")
    assert ids.tolist() == [_row([A, CAT]), _row([DOG])]
    np.testing.assert_array_equal(w[1], np.float32(_wrow([1.1])))
    # [hijack] edge cases of tokenize_line: a trailing BREAK adds nothing; a leading one and two in a
    # row leave an empty chunk; a BREAK right after a full chunk does not add an empty one
    assert ps.weighted_token_chunks(tok, "cat BREAK")[0].tolist() == [_row([CAT])]
    assert ps.weighted_token_chunks(tok, "BREAK cat")[0].tolist() == [_row([]), _row([CAT])]
    assert ps.weighted_token_chunks(tok, "cat BREAK BREAK dog")[0].tolist() == [_row([CAT]), _row([]), _row([DOG])]
    assert ps.weighted_token_chunks(tok, "cat " * 75 + "BREAK dog")[0].tolist() == [_row([CAT] * 75), _row([DOG])]
    # inside brackets the word is encoded, with A1111's negative weight
    ids, w = ps.weighted_token_chunks(tok, "(x BREAK x)")
    assert ids.tolist() == [_row([X, BREAK_WORD, X])]
    np.testing.assert_array_equal(w[0, 1:4], np.float32([1.1, -1.1, 1.1]))
    assert ps.count_chunks(tok, "BREAK cat BREAK dog") == 3


def test_comma_backtrack_moves_the_tail_to_the_next_chunk(tok):
    """[hijack] with comma_padding_backtrack=20, a chunk that fills up within 20 tokens of its last
    comma is cut after the comma; off by default (our chunking), where the cut falls at token 75."""
    prompt = "cat " * 72 + ", dog dog dog dog"  # 72 + comma + 4 = 77 tokens
    ids, _ = ps.weighted_token_chunks(tok, prompt, comma_backtrack=ps.A1111_COMMA_BACKTRACK)
    assert ids.tolist() == [_row([CAT] * 72 + [COMMA]), _row([DOG] * 4)]
    ids, _ = ps.weighted_token_chunks(tok, prompt)
    assert ids.tolist() == [_row([CAT] * 72 + [COMMA, DOG, DOG]), _row([DOG] * 2)]
    # a comma further back than the limit: no move
    far = "cat " * 50 + ", " + "dog " * 30
    ids, _ = ps.weighted_token_chunks(tok, far, comma_backtrack=20)
    assert ids.tolist() == [_row([CAT] * 50 + [COMMA] + [DOG] * 24), _row([DOG] * 6)]


def test_pad_chunks_and_batch(tok):
    ids, w = ps.weighted_token_chunks(tok, "(cat)")
    pids, pw = ps.pad_chunks(tok, ids, w, 3)
    assert pids.tolist() == [_row([CAT]), _row([]), _row([])] and pids.dtype == np.int32
    assert pw.shape == (3, 77) and np.all(pw[1:] == 1.0) and pw[0, 1] == np.float32(1.1)
    assert ids.shape == (1, 77)  # the input is not modified
    with pytest.raises(ValueError, match="down to"):
        ps.pad_chunks(tok, pids, pw, 2)
    # the negative prompt takes the prompt's chunk count, and the other way round
    b_ids, b_w = ps.tokenize_weighted(tok, ["cat BREAK dog BREAK x", "[cat]"])
    assert b_ids.shape == (2, 3, 77) and b_w.shape == (2, 231)
    assert b_ids[1].tolist() == [_row([CAT]), _row([]), _row([])]
    assert b_w[1, 1] == np.float32(1 / 1.1) and np.all(np.delete(b_w[1], 1) == 1.0)


def test_syntax_none_reads_literally(tok):
    ids, w = ps.weighted_token_chunks(tok, "(cat) BREAK dog", syntax="none")
    np.testing.assert_array_equal(ids, text.tokenize(tok, ["(cat) BREAK dog"])[0])
    assert np.all(w == 1.0)
    with pytest.raises(ValueError, match="a1111, none"):
        ps.weighted_token_chunks(tok, "cat", syntax="compel")


# --- weighting ----------------------------------------------------------------------------------

def _a1111_emphasis_reference(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sd_emphasis.py EmphasisOriginal.after_transformers, transcribed: called by process_tokens once
    per 77-token chunk, on the batch of one prompt (get_learned_conditioning encodes prompts one by one)."""
    import torch

    out = []
    for b in range(hidden.shape[0]):
        chunks = []
        for k in range(hidden.shape[1] // 77):
            z = torch.from_numpy(hidden[b:b + 1, 77 * k:77 * (k + 1)].copy())
            multipliers = torch.from_numpy(weights[b:b + 1, 77 * k:77 * (k + 1)].copy())
            original_mean = z.mean()
            z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
            new_mean = z.mean()
            z = z * (original_mean / new_mean)
            chunks.append(z)
        out.append(torch.cat(chunks, dim=1))
    return torch.cat(out).numpy()


def test_apply_weights_matches_a1111_formula():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 2 * 77, 32), dtype=np.float32) + 0.3
    weights = np.ones((2, 2 * 77), np.float32)
    weights[0, 5:9] = 1.3
    weights[0, 80:83] = 0.5  # second chunk of the first prompt
    weights[1, 10] = 1 / 1.1
    hidden_before = hidden.copy()
    out = ps.apply_weights(hidden, weights)
    np.testing.assert_array_equal(hidden, hidden_before)  # input untouched
    assert out.dtype == np.float32 and out.shape == hidden.shape
    np.testing.assert_allclose(out, _a1111_emphasis_reference(hidden, weights), rtol=2e-6, atol=1e-6)
    # the mean of each (prompt, chunk) block is restored; the weighted tokens changed
    means = lambda a: a.reshape(2, 2, 77, 32).mean(axis=(2, 3), dtype=np.float64)
    np.testing.assert_allclose(means(out), means(hidden), rtol=1e-5)
    assert not np.allclose(out[0, 5], hidden[0, 5])
    # a chunk whose weights are all 1 keeps its values exactly
    np.testing.assert_array_equal(out[1, 77:], hidden[1, 77:])


def test_apply_weights_all_ones_is_bit_identical():
    hidden = np.random.default_rng(1).standard_normal((3, 3 * 77, 16), dtype=np.float32)
    out = ps.apply_weights(hidden, np.ones((3, 3 * 77), np.float32))
    assert out is not hidden
    np.testing.assert_array_equal(out, hidden)


def test_apply_weights_shape_errors():
    with pytest.raises(ValueError, match="whole number of 77-token chunks"):
        ps.apply_weights(np.ones((1, 80, 4), np.float32), np.ones((1, 80), np.float32))
    with pytest.raises(ValueError, match="weights"):
        ps.apply_weights(np.ones((1, 77, 4), np.float32), np.ones((2, 77), np.float32))
    with pytest.raises(ValueError, match="mean 0"):
        ps.apply_weights(np.ones((1, 77, 4), np.float32), np.zeros((1, 77), np.float32))


def test_unweighted_prompt_encodes_bit_identically(tiny_sd1_engine):
    """Through a real text encoder: the weighted path on unweighted prompts gives today's hidden states."""
    from runtime.engines import open_engines

    tok = text.load_tokenizer(tiny_sd1_engine / "tokenizer")
    _, engines = open_engines(tiny_sd1_engine, backend="onnxruntime")
    try:
        prompts = ["a red barn", ", ".join(f"tree{i}" for i in range(40))]
        today = text.encode(engines["text_encoder"], text.tokenize(tok, prompts))
        ids, w = ps.tokenize_weighted(tok, prompts)
        weighted = ps.apply_weights(text.encode(engines["text_encoder"], ids), w)
        np.testing.assert_array_equal(weighted, today)
        # a weighted token moves most (the mean restoration moves every token a little)
        ids, w = ps.tokenize_weighted(tok, ["a (red:1.5) barn"])
        plain = text.encode(engines["text_encoder"], ids)
        out = ps.apply_weights(plain, w)
        change = np.abs(out - plain).mean(axis=2)[0]
        assert change[2] > 10 * np.delete(change, 2).max()
    finally:
        for e in engines.values():
            e.close()

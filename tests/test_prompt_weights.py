"""Emphasis and BREAK read as the WebUI's txt2img reads them (setting prompt_weighting), and left alone when off."""

import torch

from dreambooth_ext.train.conditioning import TextOptions, encode_prompts
from dreambooth_ext.train.long_prompts import batch_chunks, prompt_chunks
from dreambooth_ext.train.prompt_length import long_prompt_warning
from dreambooth_ext.train.prompt_weights import apply_weights, parse_weights
from tests.test_long_prompts import _Ex, clip  # noqa: F401  (clip: fixture)

WEIGHTED = TextOptions(2, weighting=True)


def _with_a_mean(encoders):
    """Copies whose last layer norm has a bias, as a real CLIP's has: then each chunk has a mean to keep
    (the tiny random encoders' chunks average ~0)."""
    import copy

    out = [copy.deepcopy(e) for e in encoders]
    with torch.no_grad():
        for e in out:
            e.text_model.final_layer_norm.bias.fill_(0.5)
    return out


def test_the_webuis_own_examples_parse_alike():
    # the examples A1111's modules/prompt_parser.py documents for parse_prompt_attention
    assert parse_weights("normal text") == [("normal text", 1.0)]
    assert parse_weights("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_weights("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_weights("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_weights("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = parse_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    want = [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
            (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert all(abs(a - b) < 1e-9 for (_, a), (_, b) in zip(got, want))
    assert parse_weights("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_weights("") == [("", 1.0)]


def test_break_starts_a_new_chunk_only_when_weighting_is_on(clip):
    tok = clip["sd1"][1][0]
    on = prompt_chunks(tok, "a cat BREAK a dog", 3, weighting=True)
    assert on == prompt_chunks(tok, "a cat", 1) + prompt_chunks(tok, "a dog", 1)
    assert prompt_chunks(tok, "a cat BREAK a dog", 3) == prompt_chunks(tok, "a cat break a dog", 1)  # off: a word
    assert len(prompt_chunks(tok, "BREAK a dog", 3, weighting=True)) == 2  # an empty first chunk, as the WebUI's
    assert prompt_chunks(tok, "(a cat BREAK a dog)", 3, weighting=True) == \
        prompt_chunks(tok, "a cat break a dog", 1)  # inside brackets its weight is scaled: a word again


def test_emphasis_weighs_the_tokens_hidden_states_and_keeps_the_chunks_mean(clip):
    encoders, toks = clip["sd1"]
    encoders = _with_a_mean(encoders)
    plain = encode_prompts(encoders, toks, ["a cat on a mat"], False, TextOptions(1))[0]
    weighted = encode_prompts(encoders, toks, ["a (cat:1.5) on a mat"], False, TextOptions(1, weighting=True))[0]
    (ids, weights), = batch_chunks(toks[0], ["a (cat:1.5) on a mat"], 1, weighting=True)
    assert ids == [prompt_chunks(toks[0], "a cat on a mat", 1)[0]]  # the same tokens, now with weights
    assert weights[0][2] == 1.5 and weights[0][:2] == [1.0, 1.0] and set(weights[0][3:]) == {1.0}
    scale = plain.mean() / (plain * torch.tensor(weights).unsqueeze(-1)).mean()
    assert torch.allclose(weighted[0, 2], plain[0, 2] * 1.5 * scale, atol=1e-6)
    assert torch.allclose(weighted[0, 5], plain[0, 5] * scale, atol=1e-6)
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)


def test_a_prompt_without_weights_is_read_bit_for_bit_as_before(clip):
    encoders, toks = clip["sd1"]
    prompts = ["a photo of sks, a cat", "a dog"]
    assert torch.equal(encode_prompts(encoders, toks, prompts, False, WEIGHTED)[0],
                       encode_prompts(encoders, toks, prompts, False, TextOptions(2))[0])
    hidden = torch.randn(2, 77, 8)
    assert apply_weights(hidden, torch.ones(2, 77)) is hidden


def test_sdxl_weighs_both_encoders_hidden_states_but_not_the_pooled_embedding(clip):
    encoders, toks = clip["sdxl"]
    plain, pooled = encode_prompts(encoders, toks, ["a cat on a mat"], True, TextOptions(1))
    weighted, pooled_w = encode_prompts(encoders, toks, ["a [cat] on a mat"], True, TextOptions(1, weighting=True))
    assert torch.equal(pooled, pooled_w)
    width = encoders[0].config.hidden_size
    for part in (slice(0, width), slice(width, None)):
        assert not torch.allclose(weighted[0, 2, part], plain[0, 2, part])


def test_the_long_caption_warning_counts_break_chunks(clip):
    tok = clip["sd1"][1][0]
    caption = "a cat BREAK a dog"
    assert long_prompt_warning(tok, [_Ex(caption)], (), 75) == []  # off: one short chunk
    (warning,) = long_prompt_warning(tok, [_Ex(caption)], (), 75, weighting=True)
    # on: the second chunk, after BREAK, is cut; said without claiming 4 tokens overflow 75
    assert "4 tokens in 2 chunks" in warning and "reads only 1 chunk of 75" in warning
    assert "first 75" not in warning and "150" in warning
    assert long_prompt_warning(tok, [_Ex(caption)], (), 150, weighting=True) == []


def test_the_setting_reaches_training_samples_and_class_images():
    from dreambooth_ext.train.config import TrainConfig

    assert TextOptions.from_config(TrainConfig(prompt_weighting=True), "sd1").weighting
    assert not TextOptions.from_config(TrainConfig(), "sdxl").weighting


def test_emphasis_under_the_gpus_bf16_layout(clip):
    """Frozen encoders stored in bf16 under bf16 autocast (the CPU stand-in for a GPU run): the weighting
    keeps the dtype and stays near the fp32 result."""
    import copy

    encoders, toks = clip["sd1"]
    encoders = _with_a_mean(encoders)
    half = [copy.deepcopy(e).to(torch.bfloat16) for e in encoders]
    prompt = ["a (cat:1.5) on a [mat] BREAK a dog"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = encode_prompts(half, toks, prompt, False, WEIGHTED)[0]
    full = encode_prompts(encoders, toks, prompt, False, WEIGHTED)[0]
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert low.shape == full.shape == (1, 154, full.shape[-1])
    assert torch.allclose(low.float(), full, atol=0.1, rtol=0.05)


def test_a_chunk_without_a_mean_is_weighted_but_not_rescaled():
    """Random tiny encoders end in a bias-free layer norm: every chunk's mean is ~0 and the WebUI's
    rescale would divide by ~0; the weights still apply."""
    hidden = torch.randn(1, 77, 8)
    hidden = hidden - hidden.mean(-1, keepdim=True)
    weights = torch.ones(1, 77)
    weights[0, 3] = 1.5
    hidden.requires_grad_(True)
    out = apply_weights(hidden, weights)
    assert torch.isfinite(out).all() and torch.allclose(out[0, 3], hidden[0, 3] * 1.5)
    out.sum().backward()  # a trained text encoder's gradient passes through finite
    assert torch.isfinite(hidden.grad).all()

"""Long prompts in 75-token chunks as the WebUI conditions them, and clip skip."""

import pytest
import torch
import transformers

from dreambooth_ext.bridge.family_data import new_text_encoder
from dreambooth_ext.tiny import tiny_family
from dreambooth_ext.tokenizer_files import write_tokenizer
from dreambooth_ext.train.conditioning import TextOptions, encode_prompts
from dreambooth_ext.train.long_prompts import batch_chunks, prompt_chunks
from dreambooth_ext.train.prompt_length import long_prompt_warning
from tests.test_webui_contract import webui  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Tiny text encoders and their tokenizers for sd1, sd2 and sdxl."""
    root = tmp_path_factory.mktemp("tok")
    toks = {pad: transformers.CLIPTokenizer.from_pretrained(str(write_tokenizer(root / str(i), pad)))
            for i, pad in enumerate(("<|endoftext|>", "!"))}
    out = {}
    for name in ("sd1", "sd2", "sdxl"):
        torch.manual_seed(0)
        encoders = [new_text_encoder(te).eval()
                    for te in tiny_family(name)["text_encoders"]]
        pads = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[name]
        out[name] = (encoders, [toks[p] for p in pads])
    return out


def _words(word, n):
    return " ".join([word] * n)


def test_chunk_layout_follows_the_webui(clip):
    tok = clip["sd1"][1][0]
    start, end = tok.bos_token_id, tok.eos_token_id
    cat = tok("cat", add_special_tokens=False).input_ids[0]
    chunks = prompt_chunks(tok, _words("cat", 100), max_chunks=3)
    assert [len(c) for c in chunks] == [77, 77]
    assert chunks[0] == [start] + [cat] * 75 + [end]
    assert chunks[1] == [start] + [cat] * 25 + [end] * 51
    # SD2's tokenizer pads with id 0 after the first end token
    sd2 = clip["sd2"][1][0]
    assert prompt_chunks(sd2, _words("cat", 100), 3)[1] == [start] + [cat] * 25 + [end] + [0] * 50
    # a comma within the last 20 tokens of a full chunk moves the words after it to the next chunk
    dog, comma = tok("dog", add_special_tokens=False).input_ids[0], tok(",", add_special_tokens=False).input_ids[0]
    first, second = prompt_chunks(tok, _words("cat", 70) + ", " + _words("dog", 10), 3)
    assert first == [start] + [cat] * 70 + [comma] + [end] * 5
    assert second == [start] + [dog] * 10 + [end] * 66
    # a batch pads the shorter prompt with an empty chunk: start, then end tokens
    batch = batch_chunks(tok, [_words("cat", 100), "cat"], 3)
    ids, weights = batch[1]
    assert ids[1] == [start] + [end] * 76 and weights[1] == [1.0] * 77
    assert prompt_chunks(tok, _words("cat", 300), 3)[2][1:76] == [cat] * 75  # 225 tokens at most


def test_tokens_past_75_condition_only_with_150(clip):
    encoders, toks = clip["sd1"]
    a, b = _words("cat", 75) + " " + _words("dog", 20), _words("cat", 75) + " " + _words("tree", 20)
    short = encode_prompts(encoders, toks, [a, b], False, TextOptions(1))[0]
    assert short.shape[1] == 77 and torch.equal(short[0], short[1])  # cut: the tails make no difference
    long = encode_prompts(encoders, toks, [a, b], False, TextOptions(2))[0]
    assert long.shape[1] == 154
    assert torch.equal(long[:, :77], short)  # the first chunk is the 75-token conditioning
    assert not torch.allclose(long[0, 77:], long[1, 77:])
    # each chunk is encoded alone and the chunks are concatenated along the sequence
    ids = torch.tensor(prompt_chunks(toks[0], a, 2))
    assert torch.allclose(long[0], torch.cat(list(encoders[0](ids)[0])), atol=1e-6)


def test_sdxl_chunks_both_encoders_and_pools_the_first_chunk(clip):
    encoders, toks = clip["sdxl"]
    prompt = _words("cat", 75) + " " + _words("dog", 20)
    emb, pooled = encode_prompts(encoders, toks, [prompt], True, TextOptions(2))
    widths = [e.config.hidden_size for e in encoders]
    assert emb.shape == (1, 154, sum(widths))
    for i, (enc, tok) in enumerate(zip(encoders, toks)):
        ids = torch.tensor(prompt_chunks(tok, prompt, 2))
        hidden = enc(ids, output_hidden_states=True).hidden_states[-2]
        part = emb[0, :, sum(widths[:i]):sum(widths[:i + 1])]
        assert torch.allclose(part, torch.cat(list(hidden)), atol=1e-6)
    first_chunk = torch.tensor(prompt_chunks(toks[1], prompt, 1))
    assert torch.allclose(pooled, encoders[1](first_chunk)[0], atol=1e-6)


def test_clip_skip_2_is_the_normed_penultimate_layer(clip):
    encoders, toks = clip["sd1"]
    ids = torch.tensor(prompt_chunks(toks[0], "a photo of sks", 1))
    out = encoders[0](ids, output_hidden_states=True)
    emb = encode_prompts(encoders, toks, ["a photo of sks"], False, TextOptions(1, clip_skip=2))[0]
    assert torch.equal(emb, encoders[0].text_model.final_layer_norm(out.hidden_states[-2]))
    assert not torch.allclose(emb, out.last_hidden_state)
    last = encode_prompts(encoders, toks, ["a photo of sks"], False, TextOptions(1, clip_skip=1))[0]
    assert torch.equal(last, out.last_hidden_state)


def test_clip_skip_is_sd1_only():
    from dreambooth_ext.train.config import TrainConfig

    cfg = TrainConfig(clip_skip=2, max_prompt_tokens=150)
    assert TextOptions.from_config(cfg, "sd1") == TextOptions(2, 2)
    assert TextOptions.from_config(cfg, "sdxl") == TextOptions(2, 1)


class _Ex:
    def __init__(self, prompt, path="/nowhere/x.png"):
        self.prompt, self.path = prompt, path


def test_a_caption_still_cut_is_warned_about(clip):
    tok = clip["sd1"][1][0]
    caption = _words("cat", 160)
    (warning,) = long_prompt_warning(tok, [_Ex(caption)], (), 150)
    assert "160 tokens" in warning and "first 150" in warning and "225" in warning
    assert long_prompt_warning(tok, [_Ex(caption)], (), 225) == []
    assert long_prompt_warning(tok, [_Ex(_words("cat", 100))], (), 150) == []
    assert "first 75" in long_prompt_warning(tok, [_Ex(_words("cat", 100))])[0]


def test_the_warning_names_a_caption_file_only_when_the_prompt_came_from_it(clip, tmp_path):
    tok = clip["sd1"][1][0]
    image = tmp_path / "pose1.png"
    image.write_bytes(b"")
    caption = _words("dog", 90)
    (tmp_path / "pose1.txt").write_text(caption + "\n")
    (from_caption,) = long_prompt_warning(tok, [_Ex(caption, image)])
    assert str(tmp_path / "pose1.txt") in from_caption
    (from_prompt,) = long_prompt_warning(tok, [_Ex(_words("cat", 90), image)])  # caption mode "prompt"
    assert "pose1.txt" not in from_prompt and "the prompt 'cat cat" in from_prompt
    (tmp_path / "pose1.txt").write_bytes(b"\xff\xfe bad")  # not UTF-8, and unused: still the prompt's warning
    assert "the prompt 'cat" in long_prompt_warning(tok, [_Ex(_words("cat", 90), image)])[0]


def test_a_prompt_that_fits_reads_no_caption_file(clip, monkeypatch):
    import dreambooth_ext.train.prompt_length as prompt_length

    def unread(_path):
        raise AssertionError("a caption read again for a prompt that is not cut")

    monkeypatch.setattr(prompt_length, "read_caption", unread)
    assert long_prompt_warning(clip["sd1"][1][0], [_Ex(_words("cat", 10))] * 3) == []


def test_the_tab_starts_from_the_webuis_clip_skip(webui):
    from dreambooth_ext.jobs import JobRunner
    from dreambooth_ext.ui.handlers import Handlers
    from tests.test_webui_contract import host

    assert host().clip_skip() is None or host().clip_skip() == 1
    webui.shared.opts.data["CLIP_stop_at_last_layers"] = 2  # the user's Clip skip slider in the WebUI
    assert host().clip_skip() == 2
    assert Handlers(host(), JobRunner()).initial_form()["clip_skip"] == 2

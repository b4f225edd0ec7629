"""The shipped CLIP tokenizer files load offline and tokenize like the published CLIP tokenizer."""

import os

# Set before transformers is imported: a local folder must never reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json

import pytest
from transformers import CLIPTokenizer

from dreambooth_ext.tokenizer_files import TOKENIZER_DATA_DIR, write_tokenizer

EOT = 49407
SOT = 49406


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"])
def tokenizer(request, tmp_path_factory):
    folder = write_tokenizer(tmp_path_factory.mktemp("tok"), pad_token=request.param)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_data_folder_holds_only_the_two_files():
    assert sorted(p.name for p in TOKENIZER_DATA_DIR.iterdir()) == ["merges.txt", "vocab.json"]
    with open(TOKENIZER_DATA_DIR / "merges.txt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) == 1 + 48894


def test_known_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert len(tokenizer) == 49408
    assert tokenizer.vocab_size == 49408
    assert tokenizer.bos_token_id == SOT
    assert tokenizer.eos_token_id == EOT
    assert tokenizer.unk_token_id == EOT
    assert tokenizer.model_max_length == 77


def test_padding_uses_the_pad_token(tokenizer):
    expected_pad = EOT if tokenizer.pad_token == "<|endoftext|>" else 0
    assert tokenizer.pad_token_id == expected_pad
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[:7] == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert ids[7:] == [expected_pad] * 70


def test_truncation_keeps_eos(tokenizer):
    ids = tokenizer("cat " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == SOT and ids[-1] == EOT


def test_made_up_word_splits_into_known_pieces(tokenizer):
    ids = tokenizer("sks_pixarstyle").input_ids
    inner = ids[1:-1]
    assert ids[0] == SOT and ids[-1] == EOT
    assert len(inner) > 1
    assert all(0 <= i < SOT for i in inner)  # no unk (= eot) and no special ids


def test_written_config_files(tmp_path):
    write_tokenizer(tmp_path, pad_token="!", model_max_length=77)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    special = json.loads((tmp_path / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special == {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",
    }


def test_rejects_a_pad_token_outside_the_vocab(tmp_path):
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path, pad_token="<pad>")

"""The CLIP tokenizer shipped with the extension, so no model hub is ever needed.

vocab.json and merges.txt under data/tokenizer/ are built by tools/build_clip_tokenizer.py from
the original CLIP BPE list. All Stable Diffusion text encoders share them; only the pad token
differs (SD1 and SDXL's first tokenizer pad with "<|endoftext|>", SD2 and SDXL's second with "!").
"""

import json
import shutil
from pathlib import Path
from typing import Union

DATA_DIR = Path(__file__).resolve().parent / "data"
TOKENIZER_DATA_DIR = DATA_DIR / "tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKENS = ("<|endoftext|>", "!")


def write_tokenizer(
    dst_dir: Union[str, Path], pad_token: str = EOS_TOKEN, model_max_length: int = 77
) -> Path:
    """Write a complete CLIPTokenizer folder (loadable with from_pretrained, offline) to dst_dir."""
    if pad_token not in PAD_TOKENS:
        raise ValueError(f"pad_token must be one of {PAD_TOKENS}, got {pad_token!r}")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DATA_DIR / name, dst / name)
    special, config = _configs(pad_token, model_max_length)
    _write_json(dst / "tokenizer_config.json", config)
    _write_json(dst / "special_tokens_map.json", special)
    return dst


def _configs(pad_token: str, model_max_length: int):
    """special_tokens_map.json and tokenizer_config.json of a tokenizer folder."""
    # Plain-string special tokens load the same under transformers 4.30 and 4.46.
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    config = dict(special)
    config.update(
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": model_max_length,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": True,
        }
    )
    return special, config


def load_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = 77):
    """The CLIPTokenizer that loading a folder written by write_tokenizer gives, without the folder."""
    from transformers import CLIPTokenizer

    if pad_token not in PAD_TOKENS:
        raise ValueError(f"pad_token must be one of {PAD_TOKENS}, got {pad_token!r}")
    _special, config = _configs(pad_token, model_max_length)
    kwargs = {k: v for k, v in config.items() if k != "tokenizer_class"}
    tokenizer = CLIPTokenizer(str(TOKENIZER_DATA_DIR / "vocab.json"), str(TOKENIZER_DATA_DIR / "merges.txt"), **kwargs)
    sanitize = getattr(tokenizer, "sanitize_special_tokens", None)
    if sanitize is not None:
        sanitize()  # what from_pretrained does under transformers < 4.34: special tokens are never split
    return tokenizer


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")

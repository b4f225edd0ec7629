"""Captions beside images (``x.png`` -> ``x.txt``) and how they combine with a concept's prompt.

Modes:
- ``prompt``: the prompt template alone; captions are ignored.
- ``filewords``: the ``[filewords]`` word in the template becomes the caption; without a caption it
  is removed, with the comma and spaces around it. A template without the word stays as it is.
- ``caption``: the caption is the whole prompt; an image without one falls back to the template.
"""

import re
from pathlib import Path
from typing import Optional

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import FILEWORDS, Concept, choices_of

MODES = choices_of("caption_mode", Concept)
_FILEWORDS_RE = re.compile(re.escape(FILEWORDS), re.IGNORECASE)


def has_filewords(template: str) -> bool:
    """Whether a prompt template holds the [filewords] word (in any case, as build_prompt reads it)."""
    return bool(_FILEWORDS_RE.search(template))


def without_filewords(template: str) -> str:
    """The template with every [filewords] word replaced by a space."""
    return _FILEWORDS_RE.sub(" ", template)


def caption_path(image_path) -> Path:
    return Path(image_path).with_suffix(".txt")


def read_caption(image_path) -> Optional[str]:
    """The caption for an image, or None when it has no ``.txt`` or the file is blank.

    Lines are joined with ", " so a one-tag-per-line file reads like a tag list.
    """
    path = caption_path(image_path)
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig drops the BOM Windows editors add
    except UnicodeDecodeError:
        raise UserError(f"The caption {path} is not UTF-8 text; save it again as UTF-8.") from None
    lines = [line.strip().rstrip(",").strip() for line in text.splitlines()]
    caption = ", ".join(line for line in lines if line)
    return caption or None


def build_prompt(template: str, caption: Optional[str], mode: str) -> str:
    """The training prompt for one image (see the module docstring for the modes)."""
    if mode not in MODES:
        raise ValueError(f"caption mode must be one of {', '.join(MODES)}, not {mode!r}")
    caption = tidy(caption or "")
    if mode == "caption" and caption:
        return caption
    if mode == "filewords":
        return tidy(_FILEWORDS_RE.sub(lambda _: caption, template))
    # A placeholder left in a template must never reach the text encoder as literal text.
    return tidy(_FILEWORDS_RE.sub("", template))


def prompt_for_image(image_path, template: str, mode: str) -> str:
    caption = read_caption(image_path) if mode != "prompt" else None
    return build_prompt(template, caption, mode)


def tidy(text: str) -> str:
    """Collapse whitespace and the empty comma slots a removed word leaves behind."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")

"""Per-step variations of an instance caption: tag shuffling with kept leading tags, and caption dropout.

As kohya's sd-scripts (--shuffle_caption --keep_tokens, --caption_dropout_rate): a caption is read as
comma-separated tags; the first `keep_tokens` tags stay in place and the rest are shuffled; with
probability `caption_dropout` the whole caption is replaced by the empty prompt. Every draw is a function
of (seed, micro-batch index, slot), so a resumed run sees exactly the captions an uninterrupted one would.
"""

import random

from dreambooth_ext.train.derived import derived_seed


def shuffle_tags(caption: str, keep: int, rng: random.Random) -> str:
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    fixed, rest = tags[:keep], tags[keep:]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)


def caption_for_step(caption: str, cfg, micro: int, slot: int) -> str:
    """The caption an instance example is trained with at micro-batch `micro`, position `slot`."""
    if cfg.caption_dropout > 0:
        if random.Random(derived_seed(cfg.seed, "caption-dropout", micro, slot)).random() < cfg.caption_dropout:
            return ""
    if cfg.shuffle_tags and "," in caption:
        return shuffle_tags(caption, cfg.keep_tokens, random.Random(derived_seed(cfg.seed, "tags", micro, slot)))
    return caption


def varies(cfg) -> bool:
    return bool(cfg.shuffle_tags or cfg.caption_dropout > 0)

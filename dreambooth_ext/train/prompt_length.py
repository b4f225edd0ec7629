"""Prompts longer than the run reads (max_prompt_tokens) are cut there: say so once, naming where one came from."""

from typing import List, Sequence

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.captions import caption_path, read_caption, tidy
from dreambooth_ext.train.long_prompts import CHUNK, chunk_count, kept_tokens, token_count

WINDOW = CHUNK  # CLIP reads 77 tokens: the start and end markers and 75 of the prompt


def _origin(example) -> str:
    """The caption file when the prompt holds its text (caption modes), else the prompt itself."""
    try:
        caption = read_caption(example.path)
    except UserError:  # an unreadable caption the run does not use (caption mode "prompt")
        caption = None
    if caption and tidy(caption) in example.prompt:
        return f"the caption file {caption_path(example.path)}"
    return f"the prompt {example.prompt[:60]!r}{'...' if len(example.prompt) > 60 else ''}"


def long_prompt_warning(tokenizer, examples: Sequence, extra_prompts: Sequence[str] = (),
                        max_tokens: int = WINDOW, weighting: bool = False) -> List[str]:
    """One warning for every prompt cut at max_tokens (75, 150 or 225: chunks of 75), or none."""
    chunks = max(1, max_tokens // CHUNK)
    seen, long = {}, []

    def check(prompt: str, where):
        """`where` names the prompt's origin when called: only for a prompt that is cut (it may read a file)."""
        if prompt in seen:
            return
        total = token_count(tokenizer, prompt, weighting)
        seen[prompt] = total
        if kept_tokens(tokenizer, prompt, chunks, weighting) < total:
            long.append((where(), total, chunk_count(tokenizer, prompt, weighting)))

    for ex in examples:
        check(ex.prompt, lambda ex=ex: _origin(ex))
    for prompt in extra_prompts:
        if prompt:
            check(prompt, lambda prompt=prompt: f"the sample prompt {prompt[:60]!r}")
    if not long:
        return []
    where, count, needed = long[0]
    more = f" and {len(long) - 1} more" if len(long) > 1 else ""
    if chunks >= 3:
        fix = "shorten it"
    else:
        fix = f"shorten it, or raise 'max_prompt_tokens' to {(chunks + 1) * CHUNK}"
    if count <= chunks * CHUNK:  # short, but its BREAKs start more chunks than are read
        return [f"{where} has {count} tokens in {needed} chunks (each BREAK starts one){more}; the text encoder "
                f"reads only {chunks} chunk{'s' if chunks > 1 else ''} of {CHUNK} (max_prompt_tokens), so the text "
                f"after the last one read is ignored: {fix.replace('shorten it', 'use fewer BREAKs')}."]
    return [f"{where} has {count} tokens{more}; the text encoder reads only the first {chunks * CHUNK} "
            f"(max_prompt_tokens), so the rest is ignored: {fix}."]

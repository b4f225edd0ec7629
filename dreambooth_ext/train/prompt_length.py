"""Prompts longer than the run reads (max_prompt_tokens) are cut there: say so once, naming where one came from."""

from pathlib import Path
from typing import List, Sequence

from dreambooth_ext.train.long_prompts import CHUNK, kept_tokens, token_count

WINDOW = CHUNK  # CLIP reads 77 tokens: the start and end markers and 75 of the prompt


def _origin(example) -> str:
    caption = Path(example.path).with_suffix(".txt")
    if caption.is_file():
        return f"the caption file {caption}"
    return f"the prompt {example.prompt[:60]!r}{'...' if len(example.prompt) > 60 else ''}"


def long_prompt_warning(tokenizer, examples: Sequence, extra_prompts: Sequence[str] = (),
                        max_tokens: int = WINDOW, weighting: bool = False) -> List[str]:
    """One warning for every prompt cut at max_tokens (75, 150 or 225: chunks of 75), or none."""
    chunks = max(1, max_tokens // CHUNK)
    seen, long = {}, []

    def check(prompt: str, where: str):
        if prompt in seen:
            return
        total = token_count(tokenizer, prompt, weighting)
        seen[prompt] = total
        if kept_tokens(tokenizer, prompt, chunks, weighting) < total:
            long.append((where, total))

    for ex in examples:
        check(ex.prompt, _origin(ex))
    for prompt in extra_prompts:
        if prompt:
            check(prompt, f"the sample prompt {prompt[:60]!r}")
    if not long:
        return []
    where, count = long[0]
    more = f" and {len(long) - 1} more" if len(long) > 1 else ""
    if chunks >= 3:
        fix = "shorten it"
    else:
        fix = f"shorten it, or raise 'max_prompt_tokens' to {(chunks + 1) * CHUNK}"
    return [f"{where} has {count} tokens{more}; the text encoder reads only the first {chunks * CHUNK} "
            f"(max_prompt_tokens), so the rest is ignored: {fix}."]

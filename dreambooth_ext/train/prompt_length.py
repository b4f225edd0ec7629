"""Prompts longer than the text encoder's window are cut there: say so once, naming where one came from."""

from pathlib import Path
from typing import List, Sequence

WINDOW = 75  # CLIP reads 77 tokens: the start and end markers and 75 of the prompt


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, truncation=False, add_special_tokens=False).input_ids)


def _origin(example) -> str:
    caption = Path(example.path).with_suffix(".txt")
    if caption.is_file():
        return f"the caption file {caption}"
    return f"the prompt {example.prompt[:60]!r}{'...' if len(example.prompt) > 60 else ''}"


def long_prompt_warning(tokenizer, examples: Sequence, extra_prompts: Sequence[str] = ()) -> List[str]:
    """One warning for every prompt over the window, or none."""
    seen, long = {}, []
    for ex in examples:
        if ex.prompt not in seen:
            seen[ex.prompt] = _tokens(tokenizer, ex.prompt)
            if seen[ex.prompt] > WINDOW:
                long.append((_origin(ex), seen[ex.prompt]))
    for prompt in extra_prompts:
        if prompt and prompt not in seen:
            seen[prompt] = _tokens(tokenizer, prompt)
            if seen[prompt] > WINDOW:
                long.append((f"the sample prompt {prompt[:60]!r}", seen[prompt]))
    if not long:
        return []
    where, count = long[0]
    more = f" and {len(long) - 1} more" if len(long) > 1 else ""
    return [f"{where} has {count} tokens{more}; the text encoder reads only the first {WINDOW}, so the rest is "
            "ignored: shorten it."]

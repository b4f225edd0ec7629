"""Prompts past the text encoder's 75 tokens, split the way the WebUI conditions them in txt2img.

The WebUI cuts a prompt into chunks of 75 tokens; each chunk gets its own start and end tokens and
is padded to 77, is encoded alone, and the chunks' hidden states are put one after the other along
the sequence (77, 154, 231 ... positions). When a chunk fills up and a comma lies within its last
20 tokens, the words after that comma move to the next chunk (the WebUI's "comma padding
backtrack", 20 by default). In a batch, prompts with fewer chunks get empty chunks (start, then
end tokens) so every prompt has as many as the longest. SDXL's pooled embedding is the first
chunk's. Here the number of chunks is capped by the setting `max_prompt_tokens` (75/150/225).
"""

from typing import List, Sequence

CHUNK = 75  # tokens of a prompt per chunk; with the start and end tokens the encoder reads 77
COMMA_BACKTRACK = 20  # the WebUI's default comma_padding_backtrack


def _comma_id(tokenizer) -> int:
    cached = getattr(tokenizer, "_dreambooth_comma_id", None)
    if cached is None:
        cached = tokenizer.get_vocab().get(",</w>", -1)
        tokenizer._dreambooth_comma_id = cached
    return cached


def prompt_token_ids(tokenizer, prompt: str) -> List[int]:
    """The prompt's tokens without start and end markers, never cut."""
    return list(tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids)


def split_tokens(tokens: Sequence[int], comma: int, backtrack: int = COMMA_BACKTRACK) -> List[List[int]]:
    """The prompt's tokens in chunks of at most CHUNK, moving a chunk's words after a late comma onward."""
    chunks: List[List[int]] = []
    current: List[int] = []
    last_comma = -1
    for token in tokens:
        if token == comma:
            last_comma = len(current)
        elif backtrack and len(current) == CHUNK and last_comma != -1 and len(current) - last_comma <= backtrack:
            chunks.append(current[:last_comma + 1])
            current, last_comma = current[last_comma + 1:], -1
        if len(current) == CHUNK:
            chunks.append(current)
            current, last_comma = [], -1
        current.append(token)
    if current or not chunks:
        chunks.append(current)
    return chunks


def frame_chunk(tokenizer, content: Sequence[int]) -> List[int]:
    """77 ids: start, the content, end tokens up to 76, end; past the first end, the tokenizer's pad id
    (SD1 pads with the end token itself; SD2 and SDXL's second encoder with 0)."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    ids = [start] + list(content) + [end] * (CHUNK - len(content)) + [end]
    first_end = len(content) + 1
    return ids[:first_end + 1] + [pad] * (len(ids) - first_end - 1)


def prompt_chunks(tokenizer, prompt: str, max_chunks: int = 1) -> List[List[int]]:
    """The framed 77-id chunks of one prompt, at most max_chunks of them."""
    chunks = split_tokens(prompt_token_ids(tokenizer, prompt), _comma_id(tokenizer))
    return [frame_chunk(tokenizer, c) for c in chunks[:max_chunks]]


def batch_chunks(tokenizer, prompts: Sequence[str], max_chunks: int = 1) -> List[List[List[int]]]:
    """For each chunk position, the ids of every prompt: a shorter prompt gets empty chunks."""
    per_prompt = [prompt_chunks(tokenizer, p, max_chunks) for p in prompts]
    count = max(len(c) for c in per_prompt)
    empty = frame_chunk(tokenizer, [])
    return [[c[i] if i < len(c) else empty for c in per_prompt] for i in range(count)]


def kept_tokens(tokenizer, prompt: str, max_chunks: int) -> int:
    """How many of the prompt's tokens the encoder reads with max_chunks chunks."""
    chunks = split_tokens(prompt_token_ids(tokenizer, prompt), _comma_id(tokenizer))
    return sum(len(c) for c in chunks[:max_chunks])

"""Prompts past the text encoder's 75 tokens, split the way the WebUI conditions them in txt2img.

The WebUI cuts a prompt into chunks of 75 tokens; each chunk gets its own start and end tokens and
is padded to 77, is encoded alone, and the chunks' hidden states are put one after the other along
the sequence (77, 154, 231 ... positions). When a chunk fills up and a comma lies within its last
20 tokens, the words after that comma move to the next chunk (the WebUI's "comma padding
backtrack", 20 by default). In a batch, prompts with fewer chunks get empty chunks (start, then
end tokens) so every prompt has as many as the longest. SDXL's pooled embedding is the first
chunk's. Here the number of chunks is capped by the setting `max_prompt_tokens` (75/150/225).
With `prompt_weighting` the prompt is first read for emphasis and BREAK (see prompt_weights): each
piece is tokenized on its own, its tokens carry its weight, and a BREAK ends the chunk.
"""

from typing import List, Optional, Sequence, Tuple

from dreambooth_ext.train.prompt_weights import BREAK, parse_weights

CHUNK = 75  # tokens of a prompt per chunk; with the start and end tokens the encoder reads 77
COMMA_BACKTRACK = 20  # the WebUI's default comma_padding_backtrack

Weighted = Optional[Tuple[int, float]]  # (token id, weight); None where a BREAK ends the chunk
Chunk = List[Tuple[int, float]]


def _comma_id(tokenizer) -> int:
    cached = getattr(tokenizer, "_dreambooth_comma_id", None)
    if cached is None:
        cached = tokenizer.get_vocab().get(",</w>", -1)
        tokenizer._dreambooth_comma_id = cached
    return cached


def prompt_token_ids(tokenizer, prompt: str) -> List[int]:
    """The prompt's tokens without start and end markers, never cut."""
    return list(tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids)


def weighted_tokens(tokenizer, prompt: str, weighting: bool = False) -> List[Weighted]:
    """The prompt's tokens with their weights (all 1 without weighting), None for each BREAK."""
    if not weighting:
        return [(t, 1.0) for t in prompt_token_ids(tokenizer, prompt)]
    out: List[Weighted] = []
    for text, weight in parse_weights(prompt):
        if text == BREAK and weight == -1:  # a BREAK inside brackets got scaled: the WebUI reads it as a word
            out.append(None)
        else:
            out += [(t, weight) for t in prompt_token_ids(tokenizer, text)]
    return out


def split_weighted(items: Sequence[Weighted], comma: int, backtrack: int = COMMA_BACKTRACK) -> List[Chunk]:
    """Tokens in chunks of at most CHUNK: a chunk's words after a late comma move onward, a BREAK ends it."""
    chunks: List[Chunk] = []
    current: Chunk = []
    last_comma = -1
    for item in items:
        if item is None:
            chunks.append(current)
            current, last_comma = [], -1
            continue
        if item[0] == comma:
            last_comma = len(current)
        elif backtrack and len(current) == CHUNK and last_comma != -1 and len(current) - last_comma <= backtrack:
            chunks.append(current[:last_comma + 1])
            current, last_comma = current[last_comma + 1:], -1
        if len(current) == CHUNK:
            chunks.append(current)
            current, last_comma = [], -1
        current.append(item)
    if current or not chunks:
        chunks.append(current)
    return chunks


def split_tokens(tokens: Sequence[int], comma: int, backtrack: int = COMMA_BACKTRACK) -> List[List[int]]:
    """Unweighted tokens in chunks, as split_weighted cuts them."""
    return [[t for t, _ in c] for c in split_weighted([(t, 1.0) for t in tokens], comma, backtrack)]


def frame_chunk(tokenizer, content: Sequence[int]) -> List[int]:
    """77 ids: start, the content, end tokens up to 76, end; past the first end, the tokenizer's pad id
    (SD1 pads with the end token itself; SD2 and SDXL's second encoder with 0)."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    ids = [start] + list(content) + [end] * (CHUNK - len(content)) + [end]
    first_end = len(content) + 1
    return ids[:first_end + 1] + [pad] * (len(ids) - first_end - 1)


def frame_weights(content: Sequence[float]) -> List[float]:
    """77 weights to go with frame_chunk's ids: the markers and the padding weigh 1."""
    return [1.0] + list(content) + [1.0] * (CHUNK + 1 - len(content))


def _chunks(tokenizer, prompt: str, max_chunks: int, weighting: bool) -> List[Chunk]:
    return split_weighted(weighted_tokens(tokenizer, prompt, weighting), _comma_id(tokenizer))[:max_chunks]


def prompt_chunks(tokenizer, prompt: str, max_chunks: int = 1, weighting: bool = False) -> List[List[int]]:
    """The framed 77-id chunks of one prompt, at most max_chunks of them."""
    return [frame_chunk(tokenizer, [t for t, _ in c]) for c in _chunks(tokenizer, prompt, max_chunks, weighting)]


def batch_chunks(tokenizer, prompts: Sequence[str], max_chunks: int = 1,
                 weighting: bool = False) -> List[Tuple[List[List[int]], List[List[float]]]]:
    """For each chunk position, (the ids of every prompt, their weights): a shorter prompt gets empty chunks."""
    per_prompt = [_chunks(tokenizer, p, max_chunks, weighting) for p in prompts]
    count = max(len(c) for c in per_prompt)
    empty: Chunk = []
    out = []
    for i in range(count):
        at = [c[i] if i < len(c) else empty for c in per_prompt]
        out.append(([frame_chunk(tokenizer, [t for t, _ in c]) for c in at],
                    [frame_weights([w for _, w in c]) for c in at]))
    return out


def kept_tokens(tokenizer, prompt: str, max_chunks: int, weighting: bool = False) -> int:
    """How many of the prompt's tokens the encoder reads with max_chunks chunks."""
    return sum(len(c) for c in _chunks(tokenizer, prompt, max_chunks, weighting))


def chunk_count(tokenizer, prompt: str, weighting: bool = False) -> int:
    """How many chunks of up to 75 tokens the whole prompt fills (each BREAK starts a new one)."""
    return len(split_weighted(weighted_tokens(tokenizer, prompt, weighting), _comma_id(tokenizer)))


def token_count(tokenizer, prompt: str, weighting: bool = False) -> int:
    """The prompt's tokens, as the encoder would read them with no limit (BREAKs are not tokens)."""
    return sum(item is not None for item in weighted_tokens(tokenizer, prompt, weighting))

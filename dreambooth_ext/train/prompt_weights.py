"""The WebUI's prompt emphasis and BREAK, read the way its txt2img reads them (setting `prompt_weighting`).

    (word)        weight x1.1 (nested: x1.1 each)     [word]        weight / 1.1
    (word:1.5)    weight x1.5                          \\( \\) \\[ \\]   the bracket itself, as text
    BREAK         (upper case, a word of its own) the next words start a new 75-token chunk

An unclosed bracket applies to the rest of the prompt; a closing one with nothing open stays as text. Neighbouring
pieces with the same weight are joined. Each piece is tokenized on its own, as the WebUI does, and its
tokens carry its weight; after encoding, each chunk's hidden states are multiplied by their tokens'
weights and rescaled to the chunk's mean before weighting (the WebUI's emphasis "Original").
"""

import re
from typing import List, Tuple

import torch

BREAK = "BREAK"
_UP, _DOWN = 1.1, 1 / 1.1
# escapes, brackets, an explicit ":weight)" close, plain text, a lone colon
_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")

Piece = Tuple[str, float]  # (text, weight); (BREAK, -1.0) ends a chunk


def parse_weights(prompt: str) -> List[Piece]:
    """The prompt as (text, weight) pieces, with (BREAK, -1) where a chunk must end."""
    pieces: List[list] = []
    open_round: List[int] = []  # where each open bracket's pieces start
    open_square: List[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKENS.finditer(prompt):
        text, explicit = match.group(0), match.group(1)
        if text.startswith("\\"):
            pieces.append([text[1:], 1.0])  # an escaped bracket or backslash; a lone backslash is dropped
        elif text == "(":
            open_round.append(len(pieces))
        elif text == "[":
            open_square.append(len(pieces))
        elif explicit is not None and open_round:
            scale(open_round.pop(), float(explicit))
        elif text == ")" and open_round:
            scale(open_round.pop(), _UP)
        elif text == "]" and open_square:
            scale(open_square.pop(), _DOWN)
        else:  # text, or a closing bracket with nothing open (kept as text, as the WebUI keeps it)
            for i, part in enumerate(_BREAK_SPLIT.split(text)):
                if i:
                    pieces.append([BREAK, -1.0])
                if part:
                    pieces.append([part, 1.0])
    for start in open_round:
        scale(start, _UP)
    for start in open_square:
        scale(start, _DOWN)
    return _joined(pieces)


def _joined(pieces: List[list]) -> List[Piece]:
    out: List[list] = []
    for text, weight in pieces:
        if out and out[-1][1] == weight and text != BREAK and out[-1][0] != BREAK:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return [(t, w) for t, w in out] or [("", 1.0)]


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One chunk's hidden states [B, 77, D] times each token's weight [B, 77], rescaled to the mean they had."""
    if bool((weights == 1).all()):
        return hidden  # nothing weighted: the same numbers, bit for bit
    weighted = hidden * weights.to(hidden.device, hidden.dtype).unsqueeze(-1)
    before, after = hidden.float().mean(), weighted.float().mean()
    # a chunk whose mean is ~0 has no mean to keep (the WebUI's division would blow up); torch.where keeps
    # the choice on the device, so a training step gains no host sync
    has_mean = after.abs() > 1e-6 * hidden.float().abs().mean()
    one = torch.ones_like(after)
    ratio = torch.where(has_mean, before / torch.where(has_mean, after, one), one)  # no inf, even in backward
    return weighted * ratio.to(hidden.dtype)

"""Derive the Hugging Face CLIPTokenizer files from the original CLIP BPE merges list.

Usage: python tools/build_clip_tokenizer.py PATH [--out DIR]
PATH is bpe_simple_vocab_16e6.txt.gz, or an open_clip_torch wheel that contains it.
Writes vocab.json and merges.txt (default: dreambooth_ext/data/tokenizer/). The output is a
pure function of the merges list, so re-running it gives byte-identical files.
"""

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "dreambooth_ext" / "data" / "tokenizer"
GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"

VOCAB_SIZE = 49408
# CLIP keeps only the first merges: the vocab is 256 bytes + 256 "</w>" bytes + merges + 2 specials.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def byte_symbols() -> List[str]:
    """The 256 byte-level symbols in CLIP's order: printable bytes as themselves, the rest shifted to 256+."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    symbols = [chr(b) for b in printable]
    shift = 0
    for b in range(256):
        if b not in printable:
            symbols.append(chr(256 + shift))
            shift += 1
    return symbols


def read_merges_text(path: Path) -> str:
    if path.suffix == ".whl" or zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            names = [n for n in wheel.namelist() if n.endswith("/" + GZ_NAME) or n == GZ_NAME]
            if not names:
                raise SystemExit(f"{path}: no {GZ_NAME} inside")
            data = wheel.read(names[0])
        return gzip.decompress(data).decode("utf-8")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def derive(text: str) -> Tuple[Dict[str, int], List[str]]:
    lines = text.split("\n")
    # Line 0 is the "#version" header; CLIP uses lines [1, 1 + NUM_MERGES).
    merges = lines[1 : 1 + NUM_MERGES]
    if len(merges) != NUM_MERGES:
        raise SystemExit(f"expected at least {NUM_MERGES} merges, found {len(merges)}")
    for i, merge in enumerate(merges):
        if len(merge.split(" ")) != 2:
            raise SystemExit(f"merge line {i + 1} is not a pair: {merge!r}")
    tokens = byte_symbols()
    tokens += [t + "</w>" for t in tokens]
    tokens += [merge.replace(" ", "") for merge in merges]
    tokens += list(SPECIALS)
    vocab = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            raise SystemExit(f"duplicate vocab entry {token!r}")
        vocab[token] = i
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"vocab has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab, merges


def write(out_dir: Path, vocab: Dict[str, int], merges: List[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # newline="\n" so the files are identical on every OS.
    with open(out_dir / "vocab.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(vocab, f, ensure_ascii=False)
        f.write("\n")
    with open(out_dir / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for merge in merges:
            f.write(merge + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help=f"{GZ_NAME} or an open_clip_torch wheel")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    vocab, merges = derive(read_merges_text(args.source))
    write(args.out, vocab, merges)
    print(f"wrote {args.out}/vocab.json ({len(vocab)} entries) and merges.txt ({len(merges)} merges)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

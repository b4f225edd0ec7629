"""What every part of the WebUI adapter shares: the host flavours and the lazy import of its `modules.*`."""

import importlib
import sys

A1111, FORGE, SDNEXT = "a1111", "forge", "sdnext"


def _m(name: str):
    return importlib.import_module(f"modules.{name}")


def _say(text: str) -> None:
    print(f"[dreambooth] {text}", file=sys.stderr)

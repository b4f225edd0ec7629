"""Reading checkpoints lazily and writing them atomically, one tensor at a time.

Conversions walk a plan of (name, shape, dtype, producer) entries; the streaming
writer emits the safetensors header first and then each tensor's bytes, so only one
tensor is in memory at a time. Everything is written under a temporary name and renamed
into place, so a crash or a full disk never leaves a broken file where the WebUI looks.
"""

import contextlib
import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from dreambooth_ext.atomic import atomic_path
from dreambooth_ext.errors import UserError

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class TensorSource:
    """A read-only view of a checkpoint's tensors: shapes and dtypes without loading data."""

    def keys(self) -> List[str]:
        raise NotImplementedError

    def shape(self, key: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in self._key_set()

    def _key_set(self):
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}


@contextlib.contextmanager
def openable_name(path: Path) -> Iterator[str]:
    """A name the Rust and C++ readers accept, also for a file name that is not valid UTF-8."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.path.isdir("/proc/self/fd"):
                yield f"/proc/self/fd/{fd}"  # the open file itself, whatever its name's bytes
                return
        finally:
            os.close(fd)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            link = os.path.join(tmp, "checkpoint" + "".join(Path(path).suffixes[-1:]))
            os.symlink(os.path.abspath(path), link)
            yield link
        return
    yield name


class SafetensorsSource(TensorSource):
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        with openable_name(self.path) as name:
            self._file = safe_open(name, framework="pt", device="cpu")
        self.metadata = self._file.metadata() or {}
        self._keys = list(self._file.keys())
        # shapes, dtypes and byte ranges without asking the reader tensor by tensor
        self._header, self._data_start = _header_of(self.path)
        self._fd = None

    def keys(self):
        return list(self._keys)

    def shape(self, key):
        info = self._header.get(key)
        return tuple(info["shape"]) if info else tuple(self._file.get_slice(key).get_shape())

    def dtype(self, key):
        info = self._header.get(key)
        return ST_DTYPES[info["dtype"] if info else self._file.get_slice(key).get_dtype()]

    def get(self, key):
        """A fresh tensor read with plain file reads: the file is not mapped into this process, so the pages a
        load reads never count as its memory (the reader's own mapped copy would, for the file's whole size)."""
        info = self._header.get(key)
        if info is None or not hasattr(os, "preadv") or sys.byteorder != "little":
            return self._file.get_tensor(key)
        start, end = info["data_offsets"]
        t = torch.empty(info["shape"], dtype=ST_DTYPES[info["dtype"]])
        if end - start != t.numel() * t.element_size():
            return self._file.get_tensor(key)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)  # held open: the same file even if one replaces its name
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        done, offset = 0, self._data_start + start
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise UserError(f"{self.path.name} ended while {key} was read; it is probably truncated: "
                                "download or copy it again.")
            done += got
        return t

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def _header_of(path: Path):
    """(key -> header entry, where the data begins) of a safetensors file the reader has already accepted;
    ({}, 0) if it cannot be read again."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return {}, 0
    entries = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and isinstance(v.get("shape"), list) and v.get("dtype") in ST_DTYPES
               and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2}
    return entries, 8 + n


class DictSource(TensorSource):
    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None):
        self._tensors = tensors
        self.metadata = metadata or {}

    def keys(self):
        return list(self._tensors.keys())

    def shape(self, key):
        return tuple(self._tensors[key].shape)

    def dtype(self, key):
        return self._tensors[key].dtype

    def get(self, key):
        return self._tensors[key]


class RenamedSource(TensorSource):
    """A source seen through a key renaming (e.g. legacy text-encoder names)."""

    def __init__(self, inner: TensorSource, rename: Callable[[str], str]):
        self._inner = inner
        self._to_inner = {rename(k): k for k in inner.keys()}
        self.metadata = getattr(inner, "metadata", {})

    def keys(self):
        return list(self._to_inner)

    def shape(self, key):
        return self._inner.shape(self._to_inner[key])

    def dtype(self, key):
        return self._inner.dtype(self._to_inner[key])

    def get(self, key):
        return self._inner.get(self._to_inner[key])


# ----------------------------------------------------------------------------- reading


def sniff_format(path: Path) -> str:
    """'safetensors', 'zip' (torch.save) or 'pickle' (legacy torch.save), from the bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        return "zip"
    # safetensors first: a header length whose low byte is 0x80 (one file in 256) starts like a pickle
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def open_checkpoint(path) -> TensorSource:
    """Open a single-file checkpoint (.safetensors or .ckpt) without executing any code in it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file: give the path of a .safetensors or .ckpt checkpoint.")
    kind = sniff_format(path)
    if kind == "safetensors":
        try:
            return SafetensorsSource(path)
        except Exception as e:  # safetensors raises its own error type for corrupt headers/buffers
            raise UserError(
                f"{path.name} is not a readable .safetensors file ({_first_line(e)}); it is probably "
                "truncated or corrupt: download or copy it again."
            ) from None
    if kind in ("zip", "pickle"):
        return DictSource(_load_pickled_state(path))
    raise UserError(
        f"{path.name} is neither a .safetensors file nor a PyTorch .ckpt (unrecognised bytes at the start); "
        "it may be truncated, or not a model at all."
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _what_pickle_wants(e: Exception) -> str:
    """The refused part of torch's long weights-only message, without its terminal colours."""
    text = _ANSI.sub("", str(e))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"the code or object {found.group(1)}"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"a pickle instruction (operand {found.group(1)}) beyond plain tensors"
    return "objects beyond tensors"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class _Inert:
    """Stands in for the few harmless non-tensor objects real .ckpt files carry."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _inert_call(*args, **kwargs):
    return None


# Objects found in the training-time .ckpt files people share (the WebUI's own loader allows
# these too). They are replaced by inert stand-ins, never imported or run.
_KNOWN_CKPT_GLOBALS = [
    (_Inert, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_inert_call, "numpy.core.multiarray.scalar"),
    (_Inert, "numpy.dtype"),
]


def _load_pickled_state(path: Path) -> Dict[str, torch.Tensor]:
    import pickle

    try:
        with torch.serialization.safe_globals(_KNOWN_CKPT_GLOBALS), openable_name(path) as name:
            try:
                obj = torch.load(name, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(name, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path.name} was refused: its pickle asks for {_what_pickle_wants(e)}, which a checkpoint never "
            "needs. Nothing in it was executed; use a .safetensors version of this model."
        ) from None
    except Exception as e:
        raise UserError(
            f"{path.name} could not be read as a PyTorch checkpoint ({_first_line(e)[:160]}); "
            "it is probably truncated or corrupt: download or copy it again."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------- writing


@dataclass
class Entry:
    """One tensor to write: its name, final shape and dtype, and how to produce its data."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors_stream(path: Path, entries: Iterable[Entry], metadata: Optional[Dict[str, str]] = None):
    """Write a .safetensors file tensor by tensor (header first, then data), at `path` directly."""
    # Largest items first keeps every tensor aligned to its element size, as safetensors itself does.
    entries = sorted(entries, key=lambda e: (-torch.empty((), dtype=e.dtype).element_size(), e.name))
    # transformers 4.x refuses a .safetensors without a "format" entry in its metadata
    header: Dict[str, object] = {"__metadata__": {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}}
    offset = 0
    for e in entries:
        size = torch.empty((), dtype=e.dtype).element_size()
        for d in e.shape:
            size *= d
        header[e.name] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            t = e.produce()
            if tuple(t.shape) != tuple(e.shape) or t.dtype != e.dtype:
                raise RuntimeError(f"{e.name}: produced {tuple(t.shape)} {t.dtype}, planned {e.shape} {e.dtype}")
            f.write(_tensor_bytes(t))
            del t


def write_safetensors_atomic(path: Path, entries: Iterable[Entry], metadata: Optional[Dict[str, str]] = None):
    with atomic_path(path) as tmp:
        write_safetensors_stream(tmp, entries, metadata)


def write_ckpt_atomic(path: Path, entries: Iterable[Entry], metadata: Optional[Dict[str, str]] = None):
    """Legacy .ckpt (a torch.save zip of {'state_dict': ...}); holds the whole state in memory."""
    state = {e.name: e.produce() for e in entries}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "dreambooth_ext_metadata": dict(metadata or {})}, str(tmp))

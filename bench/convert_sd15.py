"""Convert a random-weight checkpoint of the real SD1.5 size both ways, next to a plain safetensors load+save.

Prints seconds and peak RSS of each step, each measured in its own child process.
Usage: ./run.sh bench convert_sd15 [--dtype fp16|fp32] [--dir DIR] [--keep]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_checkpoint(path: Path, dtype_name: str, family: str = "sd1"):
    """A real-size single file of the family (SD1.5 by default) with random weights, from the shipped configs."""
    import torch

    from dreambooth_ext.bridge.components import components_for
    from dreambooth_ext.bridge.family_data import load_family
    from dreambooth_ext.bridge.keymap import inverse_shape
    from dreambooth_ext.bridge.tensor_io import Entry, write_safetensors_atomic

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    entries = []
    for comp in components_for(load_family(family)):
        for row in comp.rows:
            if not all(d in comp.shapes for d in row.diffusers):
                continue
            shape = inverse_shape(row.op, [comp.shapes[d] for d in row.diffusers])
            if row.single.endswith("position_ids"):
                entries.append(Entry(row.single, shape, torch.int64, lambda s=shape: torch.arange(s[-1]).reshape(s)))
                continue
            entries.append(Entry(row.single, shape, dtype,
                                 lambda s=shape: (torch.randn(s, generator=gen) * 0.02).to(dtype)))
    write_safetensors_atomic(path, entries)


def plain_io(src: str, dst: str):
    from safetensors.torch import load_file, save_file

    save_file(load_file(src), dst)


def to_diffusers(src: str, dst: str):
    from dreambooth_ext.bridge import single_file_to_diffusers

    single_file_to_diffusers(src, dst, progress=lambda _m: None)


def to_single(src: str, dst: str):
    from dreambooth_ext.bridge import diffusers_to_single_file

    diffusers_to_single_file(src, dst, progress=lambda _m: None)


def measure(fn, *args):
    """Run fn(*args) in a forked child; return (seconds, peak RSS in bytes) of that child alone."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
            os._exit(0)
        except BaseException as e:  # report and fail the child
            print(f"failed: {e}", file=sys.stderr)
            os._exit(1)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{fn.__name__} failed")
    return seconds, usage.ru_maxrss * 1024


def drop_page_cache_hint(path: Path):
    """Ask the kernel to forget a file's cached pages, so each step reads from the same state."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except (OSError, AttributeError):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "sd15-random.safetensors"
    t0 = time.perf_counter()
    if not src.exists():
        measure(build_checkpoint, src, args.dtype)  # in a child, so its memory does not count below
    size = src.stat().st_size
    print(f"checkpoint: {src.name}, {size / 2**30:.2f} GiB ({args.dtype}), built in {time.perf_counter() - t0:.1f} s")
    for old in (work / "plain.safetensors", work / "diffusers", work / "back.safetensors"):
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)  # a kept --dir from an earlier run
    rows = []
    for label, fn, a, b in [
        ("plain safetensors load+save", plain_io, src, work / "plain.safetensors"),
        ("single file -> diffusers", to_diffusers, src, work / "diffusers"),
        ("diffusers -> single file", to_single, work / "diffusers", work / "back.safetensors"),
    ]:
        seconds, rss = measure(fn, str(a), str(b))
        rows.append((label, seconds, rss))
    plain_s = rows[0][1]
    print(f"{'step':32} {'seconds':>8} {'x plain':>8} {'peak RSS GiB':>13} {'x file size':>12}")
    for label, seconds, rss in rows:
        print(f"{label:32} {seconds:8.1f} {seconds / plain_s:8.2f} {rss / 2**30:13.2f} {rss / size:12.2f}")
    if not args.keep and not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

"""Single file -> the run's modules: converting to a diffusers folder and loading it back (the old way) against
building them in memory (train.models.open_base), each in its own child process, interleaved.

Prints per way the min and median wall seconds, CPU seconds and peak RSS, the peak above the import
baseline (torch, diffusers, transformers imported), and the peak once every weight has been read (from_pretrained
maps a same-dtype safetensors file, so its weights only count as memory when a first step reads them).
The third way, "load cached", loads a conversion the workspace already holds (the old way's best case).
Usage: OMP_NUM_THREADS=1 python bench/start_up.py [--kind tiny|mid|sd15|sdxl] [--file-dtype fp16|fp32]
       [--load fp32|bf16|fp16] [--repeats 3] [--dir DIR]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(kind: str, folder: Path, file_dtype: str) -> Path:
    path = folder / f"{kind}-{file_dtype}.safetensors"
    if path.is_file():
        return path
    if kind in ("sd15", "sdxl"):
        from bench.convert_sd15 import build_checkpoint

        # the real shapes, random weights, the shipped family config
        build_checkpoint(path, file_dtype, "sd1" if kind == "sd15" else "sdxl")
        return path
    import torch

    from bench.train_speed import make_checkpoint

    made = make_checkpoint(kind, folder)  # tiny or mid: a beside-yaml describes the size
    if file_dtype == "fp16":
        from safetensors.torch import load_file, save_file

        save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(made)).items()}, str(path))
        made.with_suffix(".yaml").replace(path.with_suffix(".yaml"))
        made.unlink()
    else:
        made.replace(path)
        made.with_suffix(".yaml").replace(path.with_suffix(".yaml"))
    del torch
    return path


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM (ru_maxrss survives exec on Linux, so a child
    spawned by a big parent would report the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak():
    """Start VmHWM again from the current RSS (Linux: clear_refs 5), so work before the timed part does not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(way: str, checkpoint: str, load: str, workspace: str):
    import torch
    # the import baseline both ways pay: the libraries and the model classes they import lazily
    from accelerate import init_empty_weights  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import dreambooth_ext.bridge.to_diffusers  # noqa: F401
    import dreambooth_ext.bridge.to_single  # noqa: F401

    torch.set_num_threads(1)
    from dreambooth_ext.train.models import load_bundle, open_base, prepare_base

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[load]
    dtypes = {"unet": dtype, "vae": dtype, "text_encoder": dtype}
    if way == "cached":  # a run whose workspace already holds the conversion (the same name again, a resume)
        prepare_base(checkpoint, Path(workspace), progress=lambda _m: None)
    reset_peak()
    baseline = peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    if way in ("folder", "cached"):
        bundle = load_bundle(prepare_base(checkpoint, Path(workspace), progress=lambda _m: None), dtypes=dtypes)
    else:
        bundle = open_base(checkpoint, Path(workspace), progress=lambda _m: None, dtypes=dtypes)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    modules = [bundle.unet, bundle.vae] + bundle.text_encoders
    params = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    peak = peak_rss()
    # weights a loader maps from a file only count once they are read: read every one, as a first step does
    with torch.no_grad():
        for m in modules:
            for t in m.state_dict().values():
                t.sum()
    print(json.dumps({"wall": wall, "cpu": cpu, "peak": peak, "touched": peak_rss(),
                      "baseline": baseline, "params": params}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["tiny", "mid", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--file-dtype", choices=["fp16", "fp32"], default="fp16")
    parser.add_argument("--load", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="keep the checkpoint here between invocations")
    parser.add_argument("--child", nargs=4, metavar=("WAY", "CHECKPOINT", "LOAD", "WORKSPACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        ck = build(args.kind, folder, args.file_dtype)
        rows = {"folder": [], "memory": [], "cached": []}
        for i in range(args.repeats):
            for way in ("folder", "memory", "cached"):
                # a fresh workspace with no siblings: the first run of a new checkpoint
                work = Path(tmp) / f"{way}-{i}" / "workspace"
                out = subprocess.run([sys.executable, __file__, "--child", way, str(ck), args.load, str(work)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                rows[way].append(json.loads(out.strip().splitlines()[-1]))
                r = rows[way][-1]
                print(f"  {way:6s} run {i + 1}: {r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU, peak {r['peak'] / 2**20:.0f} "
                      f"MiB, {r['touched'] / 2**20:.0f} MiB once every weight is read", flush=True)
        size = ck.stat().st_size
        print(f"{args.kind} checkpoint, {args.file_dtype} on disk ({size / 2**20:.0f} MiB), loaded as {args.load} "
              f"({rows['memory'][0]['params'] / 2**20:.0f} MiB of weights), 1 thread, {args.repeats}x interleaved:")
        print(f"{'way':12s} {'wall min/med s':>14s} {'CPU min/med s':>14s} {'peak RSS MiB':>13s} "
              f"{'above imports':>14s} {'/file size':>10s} {'after reading all':>18s} {'/file size':>10s}")
        for way, label in (("folder", "convert+load"), ("memory", "in memory"), ("cached", "load cached")):
            r = rows[way]
            wall = [x["wall"] for x in r]
            cpu = [x["cpu"] for x in r]
            peak = max(x["peak"] for x in r)
            above = max(x["peak"] - x["baseline"] for x in r)
            touched = max(x["touched"] - x["baseline"] for x in r)
            print(f"{label:12s} {min(wall):6.2f}/{statistics.median(wall):6.2f}  {min(cpu):6.2f}/{statistics.median(cpu):6.2f}"
                  f"   {peak / 2**20:11.0f} {above / 2**20:14.0f} {above / size:10.2f} {touched / 2**20:18.0f}"
                  f" {touched / size:10.2f}")
        med = {w: statistics.median(x["cpu"] for x in rows[w]) for w in rows}
        above = {w: max(x["peak"] - x["baseline"] for x in rows[w]) for w in rows}
        touched = {w: max(x["touched"] - x["baseline"] for x in rows[w]) for w in rows}
        print(f"in memory / convert+load: {med['memory'] / med['folder']:.2f}x CPU time (median), peak above imports "
              f"{above['memory'] / max(above['folder'], 1):.2f}x, after reading every weight "
              f"{touched['memory'] / max(touched['folder'], 1):.2f}x")


if __name__ == "__main__":
    main()

"""A real-size SD1.5 single file (random weights) to its first training step on the CPU: peak memory.

Each case runs in its own child process: the trainer from the single file (built in memory, no
folder written), prior preservation on with ready-made class images, batch 1, one step (`--steps 2`: two, so the
optimizer's state, made in the first step's update, is there for a whole step). Prints the peak RSS
(VmHWM) against the file's size, the peak above the import baseline, and the CPU seconds. Beside it,
the trainer's own memory estimate (train/memory.py) for the same settings and layout, which is what
the tab shows before a run. A mode with "+gc" turns on gradient checkpointing, "+fused" the
fused backward pass, "+adafactor" Adafactor in place of AdamW (e.g. full+fused, full+gc+fused+adafactor).

`--layout bf16` gives the run a GPU's dtype layout on the CPU (frozen modules stored in bf16, bf16 autocast,
trained weights fp32), which is how a user's GPU run holds its weights; the default is all fp32.

Usage: OMP_NUM_THREADS=1 python bench/first_step_sd15.py [--file-dtype fp16|fp32] [--layout fp32|bf16]
       [--modes lora,lora+gc,full] [--resolution 512] [--steps 1] [--dir DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(checkpoint: str, mode: str, resolution: int, work: str, instance: str, klass: str, layout: str = "fp32",
          steps: int = 1):
    import importlib

    import torch

    from bench.start_up import peak_rss
    from dreambooth_ext.train.config import Concept, TrainConfig
    from dreambooth_ext.train.reporter import Reporter
    from dreambooth_ext.train.run import train

    from dreambooth_ext.train.memory import estimate_for_config
    from dreambooth_ext.train.placement import EMULATE_ENV

    if layout == "bf16":
        os.environ[EMULATE_ENV] = "bf16"

    for name in ("diffusers", "transformers", "diffusers.models.unets", "diffusers.models.autoencoders"):
        importlib.import_module(name)  # the import baseline: what any run pays before a weight is read
    torch.set_num_threads(1)
    baseline = peak_rss()
    seen = {}

    class FirstStep(Reporter):
        def progress(self, step, total, loss, lr):
            if step == steps:
                seen["first"] = (time.process_time(), peak_rss())

    concept = Concept(instance_dir=instance, instance_prompt="a photo of sks_pixarstyle character",
                      class_prompt="a photo of a character", class_dir=klass, num_class_images=2)
    train_mode, *extra = mode.split("+")
    cfg = TrainConfig(checkpoint=checkpoint, name=f"first-{train_mode}", models_dir=work, concepts=[concept],
                      resolution=resolution, max_steps=steps, train_mode=train_mode, bucketing=False, hflip=False,
                      center_crop=True, mixed_precision="no", seed=1, save_state_every=0,
                      gradient_checkpointing="gc" in extra, fused_backward_pass="fused" in extra,
                      optimizer="adafactor" if "adafactor" in extra else "adamw")
    estimate = estimate_for_config(cfg, "sd1", "bf16" if layout == "bf16" else "no").training_peak
    train(cfg, FirstStep())
    cpu, peak = seen["first"]
    print(json.dumps({"peak": peak, "baseline": baseline, "cpu": cpu, "estimate": estimate}))


def images(folder: Path, n: int, resolution: int, seed: int) -> str:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.effect_noise((resolution, resolution), 30 + seed + i).convert("RGB").save(folder / f"{i}.png")
    return str(folder)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--file-dtype", choices=["fp16", "fp32"], default="fp32")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--layout", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=1,
                        help="peak up to this step (2: with the optimizer's state, made in the first step)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dir", default="", help="keep the checkpoint here between runs")
    args = parser.parse_args()
    from bench.start_up import build

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        ck = build("sd15", folder, args.file_dtype)
        size = ck.stat().st_size
        instance = images(Path(tmp) / "instance", 3, args.resolution, 0)
        klass = images(Path(tmp) / "class", 2, args.resolution, 10)
        print(f"SD1.5 shapes, random weights, {args.file_dtype} file of {size / 2**30:.2f} GiB -> first step at "
              f"{args.resolution} px, batch 1 + prior preservation, {args.layout} layout on the CPU, one thread")
        for mode in args.modes.split(","):
            code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.first_step_sd15 import child; "
                    f"child({str(ck)!r}, {mode!r}, {args.resolution}, {str(Path(tmp) / mode)!r}, {instance!r}, "
                    f"{klass!r}, {args.layout!r}, {args.steps})")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode:
                print(f"{mode}: failed\n{out.stderr[-1500:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            above = r["peak"] - r["baseline"]
            print(f"{mode:7}: peak RSS {r['peak'] / 2**30:.2f} GiB = {r['peak'] / size:.2f}x the file "
                  f"({above / size:.2f}x above the {r['baseline'] / 2**30:.2f} GiB of imports); the estimate's "
                  f"training peak {r['estimate'] / 2**30:.2f} GiB (as on a GPU: the VAE and frozen text encoder, idle once latents and prompts are cached, not counted) against "
                  f"{above / 2**30:.2f} above imports; "
                  f"step {args.steps} done at {r['cpu']:.0f} CPU s")


if __name__ == "__main__":
    main()

"""Where a run's time goes: one training run under cProfile, with the phases timed from the reporter.

Usage: OMP_NUM_THREADS=1 python bench/profile_run.py [--kind tiny|mid] [--steps N] [--top N]
Prints (in CPU seconds of this process, as wall time is noisy on a shared machine) seconds to import, to the first step, the steady step, the end of the run, and the
functions with the most cumulative time.
"""

import argparse
import cProfile
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["tiny", "mid"], default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--no-profile", action="store_true", help="phases only (cProfile slows small calls)")
    parser.add_argument("--cache-up-front", action="store_true",
                        help="encode every latent before the first step (as on a GPU), so steps time only steps")
    args = parser.parse_args()
    import torch

    from bench.train_speed import DEMO, make_checkpoint
    from dreambooth_ext.train.config import Concept, TrainConfig
    from dreambooth_ext.train.reporter import Reporter
    from dreambooth_ext.train.run import train

    torch.set_num_threads(1)
    if args.cache_up_front:
        from dreambooth_ext.train import run

        run.ENCODE_AT_FIRST_USE_ON_CPU = False
    imported = time.perf_counter()

    class Timer(Reporter):
        def __init__(self):
            self.steps, self.stages = [], []

        def progress(self, step, total, loss, lr):
            self.steps.append(time.process_time())

        def stage(self, text, done=None, total=None):
            if done is None or done == total:
                self.stages.append((time.process_time(), text))

    with tempfile.TemporaryDirectory() as tmp:
        ck = str(make_checkpoint(args.kind, Path(tmp)))
        res = 64 if args.kind == "tiny" else 256
        concept = Concept(instance_dir=str(DEMO), instance_prompt="a sks_pixarstyle character",
                          class_prompt="a pixar-style character", num_class_images=4)
        cfg = TrainConfig(checkpoint=ck, name="bench", models_dir=str(Path(tmp) / "m"), concepts=[concept],
                          resolution=res, max_steps=args.steps, bucketing=False, class_image_steps=2,
                          learning_rate=1e-5, seed=1, save_dtype="fp16")
        timer = Timer()
        prof = cProfile.Profile()
        wall0 = time.perf_counter()
        start = time.process_time()
        if not args.no_profile:
            prof.enable()
        train(cfg, timer)
        prof.disable()
        end, wall = time.process_time(), time.perf_counter() - wall0
    steps = timer.steps
    steady = (steps[-1] - steps[2]) / (len(steps) - 3) if len(steps) > 3 else float("nan")
    print(f"{args.kind} (CPU seconds): import {imported - T0:.2f} s wall; train() {end - start:.2f} s CPU, "
          f"{wall:.2f} s wall; first step done at {steps[0] - start:.2f} s; "
          f"steady step {steady * 1000:.1f} ms; after last step {end - steps[-1]:.2f} s; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    last = start
    for t, text in timer.stages:
        print(f"  {t - last:7.2f} s  -> {text[:90]}")
        last = t
    if not args.no_profile:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()

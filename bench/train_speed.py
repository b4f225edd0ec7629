"""Training speed and peak memory: tiny and mid-size SD1, full and LoRA, latents cached or encoded every step.

"encode every step" (no latent or text-embedding cache) is the work diffusers' example
train_dreambooth.py does at each step; the cached rows are this trainer's default.
Each case runs in its own spawned process; steps/s leaves out the first two (warm-up) steps.
Usage: ./run.sh bench train_speed [--steps N] [--only tiny|mid]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEMO = Path(__file__).resolve().parent.parent / "dreambooth_ext" / "data" / "demo" / "instance"


def mid_family():
    """SD1's full block pattern (4 levels, 2 resnets each) at a fifth of its width, with a VAE at half
    the real width and a 4-layer text encoder, so encoding costs what it costs relative to a step."""
    from dreambooth_ext.tiny import tiny_family

    fam = tiny_family("sd1")
    fam["text_encoders"][0]["config"].update(hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                                              num_hidden_layers=4)
    fam["unet"].update(block_out_channels=[64, 128, 256, 256], layers_per_block=2, attention_head_dim=4,
                       down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                       up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=32,
                       cross_attention_dim=256)
    fam["vae"].update(block_out_channels=[64, 128, 256, 256], layers_per_block=2)
    return fam


def make_checkpoint(kind: str, folder: Path) -> Path:
    from dreambooth_ext.tiny import build_models, single_file_from_models, tiny_family

    fam = tiny_family("sd1") if kind == "tiny" else mid_family()
    return single_file_from_models(fam, build_models(fam, 0), folder / f"{kind}.safetensors")


def run_case(checkpoint: str, work: str, resolution: int, mode: str, cached: bool, steps: int, out: str):
    from dreambooth_ext.train.config import Concept, TrainConfig
    from dreambooth_ext.train.reporter import Reporter
    from dreambooth_ext.train.run import train

    class Timer(Reporter):
        times = []

        def progress(self, step, total, loss, lr):
            self.times.append(time.perf_counter())

        def stage(self, text, done=None, total=None):
            pass

        def output(self, path, kind):
            pass

    concept = Concept(instance_dir=str(DEMO), instance_prompt="a sks_pixarstyle character",
                      class_prompt="a pixar-style character", num_class_images=4)
    cfg = TrainConfig(checkpoint=checkpoint, name="bench", models_dir=work, concepts=[concept], resolution=resolution,
                      max_steps=steps, train_mode=mode, lora_rank=8, bucketing=False, class_image_steps=2,
                      cache_latents=cached, cache_text_embeddings=cached, learning_rate=1e-4, seed=1)
    timer = Timer()
    train(cfg, timer)
    warm = timer.times[2:]  # the first steps pay for allocator and kernel warm-up
    rate = (len(warm) - 1) / (warm[-1] - warm[0])
    Path(out).write_text(str(rate))


def _child(args, out):
    import resource

    run_case(*args, out + ".rate")
    Path(out + ".rss").write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def measure(*args):
    """Run a case in a fresh (spawned) process: (steps/s, its peak RSS in bytes).

    Spawned, not forked: a fork after torch has started its thread pools can hang the child.
    """
    import multiprocessing

    out = tempfile.mktemp()
    proc = multiprocessing.get_context("spawn").Process(target=_child, args=(args, out))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit("a benchmark case failed")
    return float(Path(out + ".rate").read_text()), int(Path(out + ".rss").read_text())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", choices=["tiny", "mid"], default=None)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'model':6} {'px':>4} {'mode':5} {'latents/prompts':22} {'steps/s':>8} {'peak RSS MiB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, res in (("tiny", 64), ("mid", 256)):
            if args.only and kind != args.only:
                continue
            checkpoint = str(make_checkpoint(kind, tmp / "ck"))
            for mode in ("full", "lora"):
                for cached in (True, False):
                    work = tmp / f"{kind}-{mode}-{cached}"
                    rate, rss = measure(checkpoint, str(work), res, mode, cached, args.steps)
                    label = "cached once" if cached else "encoded every step"
                    print(f"{kind:6} {res:4d} {mode:5} {label:22} {rate:8.2f} {rss / 2**20:13.0f}")


if __name__ == "__main__":
    main()

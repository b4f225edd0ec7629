"""Calibration of the memory estimator (dreambooth_ext/train/memory.py) on the CPU.

For a family's real UNet architecture (random weights) or its tiny test model, measures the
activation memory of one LoRA training step (frozen bf16 weights, bf16 autocast, batch 2 as with
prior preservation) with torch's memory profiler, at small latent sizes, and prints it beside the
estimate. The growth between two sizes is what WHOLE_UNET_FACTOR and RECOMPUTE_FACTOR were fitted
to on sd1 (the fixed part at small sizes is CPU-kernel scratch that a GPU does not have).
The real SD1.5 UNet takes about a minute per row on one CPU core.
With --text-encoders it measures the family's real text encoders instead (LoRA adapters, two 77-token
prompts), with and without checkpointing, in bytes per token and hidden unit of each layer: what
TE_ACTIVATION_BYTES and TE_KEPT_BYTES_CHECKPOINTED were set from (seconds per row).
Usage: ./run.sh bench memory_calibrate [--family sd1|sd2|sdxl] [--tiny] [--sides 16,32] [--text-encoders]
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model of the family")
    parser.add_argument("--sides", default="16,32", help="latent sides to measure (pixels / 8)")
    parser.add_argument("--text-encoders", action="store_true", help="the family's text encoders, not its UNet")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.text_encoders:
        return text_encoders(args.family, args.tiny)
    from diffusers import UNet2DConditionModel

    from dreambooth_ext.bridge.family_data import load_family
    from dreambooth_ext.tiny import tiny_family
    from dreambooth_ext.train.memory import activation_bytes
    from dreambooth_ext.train.memory_calibration import measure_activation_bytes

    config = (tiny_family if args.tiny else load_family)(args.family)["unet"]
    unet = UNet2DConditionModel.from_config(config)
    sides = [int(s) for s in args.sides.split(",")]
    name = ("tiny " if args.tiny else "") + args.family
    print(f"{'model':<10} {'side':>4} {'checkpointing':<13} {'measured MB':>12} {'estimated MB':>12} {'ratio':>6} {'s':>6}")
    rows = {}
    for checkpointed in (False, True):
        for side in sides:
            started = time.time()
            measured = measure_activation_bytes(unet, side, 2, checkpointed=checkpointed)
            estimated = activation_bytes(config, side * side, 2, checkpointed=checkpointed, half=True)
            rows[(checkpointed, side)] = (measured, estimated)
            print(f"{name:<10} {side:>4} {'yes' if checkpointed else 'no':<13} {measured / 1e6:>12.1f} "
                  f"{estimated / 1e6:>12.1f} {measured / estimated:>6.2f} {time.time() - started:>6.1f}", flush=True)
        if len(sides) > 1:
            (m0, e0), (m1, e1) = rows[(checkpointed, sides[0])], rows[(checkpointed, sides[-1])]
            print(f"  growth {sides[0]}->{sides[-1]}: measured/estimated = {(m1 - m0) / (e1 - e0):.2f}")


def text_encoders(family: str, tiny: bool):
    import torch

    from dreambooth_ext.bridge.family_data import load_family, new_text_encoder
    from dreambooth_ext.tiny import tiny_family
    from dreambooth_ext.train.memory import TE_TOKENS, text_encoder_activation_bytes
    from dreambooth_ext.train.memory_calibration import measure_text_encoder_activation_bytes

    specs = (tiny_family if tiny else load_family)(family)["text_encoders"]
    configs = [te["config"] for te in specs]
    units = sum(c["num_hidden_layers"] * c["hidden_size"] for c in configs) * TE_TOKENS * 2
    print(f"{family} text encoders, LoRA on attention, 2 prompts of {TE_TOKENS} tokens, bf16 autocast "
          f"({units:,} token-units)")
    for checkpointed in (False, True):
        torch.manual_seed(0)
        encoders = [new_text_encoder(te) for te in specs]
        started = time.time()
        measured = measure_text_encoder_activation_bytes(encoders, 2, checkpointed=checkpointed)
        estimated = text_encoder_activation_bytes(configs, 2, checkpointed=checkpointed, half=True)
        print(f"  checkpointing {'yes' if checkpointed else 'no ':3}: measured {measured / 2**20:7.1f} MiB = "
              f"{measured / units:5.1f} bytes per unit; estimated {estimated / 2**20:7.1f} MiB, "
              f"ratio {measured / estimated:.2f}; {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()

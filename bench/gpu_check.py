"""GPU check: real-size SD1.5 and SDXL models (random weights, nothing downloaded) trained for a few steps.

For each of SD1.5 full 512 px, SD1.5 LoRA 512 px and SDXL LoRA 1024 px, in bf16 and fp16, with
PyTorch SDPA attention (and xformers when it imports): ~20 steps with prior preservation (class
images generated first), one sample and one save, and a table of it/s, peak GPU memory
(torch.cuda.max_memory_allocated and max_memory_reserved) with the phase it was reached in (a stage's
first word: class, caching, monitor:, samples, saving, or training), the training steps' own peak
and the memory estimate beside it (the estimate is for the steps), and
whether the written file reloads and generates a finite image. Full training uses 8-bit AdamW
when bitsandbytes imports. Rows run most important first and stop at the time budget (--budget,
default 7 minutes), so the whole check ends within 8 minutes on one modern GPU.

    ./run.sh gpu-check                       # on a machine with an NVIDIA GPU
    ./run.sh gpu-check --dry-run             # tiny models on the CPU (bf16 stand-in): what the tests run
    ./run.sh gpu-check --only sd15-lora-512 --precisions bf16 --steps 10 --json out.json
"""

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEMO = Path(__file__).resolve().parent.parent / "dreambooth_ext" / "data" / "demo" / "instance"
# name, family, train mode, resolution, gradient checkpointing, fused backward pass (fp32 AdamW; bf16 only),
# and optionally the optimizer (otherwise 8-bit AdamW for full runs where bitsandbytes is, else AdamW)
CASES = [
    ("sd15-full-512", "sd1", "full", 512, True, False),
    ("sd15-full-512-fused", "sd1", "full", 512, True, True),
    # the lowest-memory full recommendation: Adafactor's state and autocast's released copies show here
    ("sd15-full-512-adafactor-fused", "sd1", "full", 512, True, True, "adafactor"),
    ("sd15-lora-512", "sd1", "lora", 512, False, False),
    ("sdxl-lora-1024", "sdxl", "lora", 1024, True, False),
]


@dataclass
class Row:
    case: str
    precision: str
    attention: str
    optimizer: str = ""
    it_per_s: float = float("nan")
    peak_allocated_gb: float = float("nan")
    peak_reserved_gb: float = float("nan")
    train_peak_gb: float = float("nan")  # the training steps alone: what the estimate is for
    peak_phase: str = ""  # the phase (a stage's first word, or "training") where the whole run peaked
    estimate_gb: float = float("nan")  # the whole run's (steps or samples, whichever is higher)
    estimate_train_gb: float = float("nan")  # the training steps'
    loss_finite: bool = False
    reloads_and_generates: Optional[bool] = None  # None: not checked in this row
    seconds: float = 0.0
    error: str = ""


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:  # noqa: BLE001 - a broken build is "not available"
        return False


def build_base(family: str, folder: Path, tiny: bool) -> Path:
    """A diffusers folder of random weights at the family's real size (fp16 on disk), or a tiny WebUI single file."""
    import torch

    from dreambooth_ext.bridge.family_data import load_family
    from dreambooth_ext.bridge.ldm_yaml_write import generate_yaml
    from dreambooth_ext.tiny import build_models, save_diffusers, write_tiny_checkpoint

    if tiny:  # the user's path: a single file the trainer converts first
        return write_tiny_checkpoint(family, folder / f"tiny-{family}.safetensors", seed=0)
    fam = load_family(family)
    torch.set_num_threads(os.cpu_count() or 1)  # random init of billions of weights: every core helps
    models = {k: m.to(torch.float16) for k, m in build_models(fam, seed=0).items()}
    sidecar = {"family": fam["family"], "yaml_text": generate_yaml(fam, clip_version=None)}
    return save_diffusers(fam, models, folder, sidecar)


def _config(base: Path, work: Path, name: str, family: str, mode: str, resolution: int, checkpointed: bool,
            precision: str, attention: str, optimizer: str, steps: int, fused: bool = False):
    from dreambooth_ext.train.config import Concept, TrainConfig

    concept = Concept(instance_dir=str(DEMO), instance_prompt="a sks_pixarstyle character",
                      class_prompt="a pixar-style character", num_class_images=2)
    return TrainConfig(checkpoint=str(base), name=name, models_dir=str(work / "models"), concepts=[concept],
                       family=family, resolution=resolution, max_steps=steps, train_mode=mode,
                       mixed_precision=precision, attention=attention, optimizer=optimizer,
                       gradient_checkpointing=checkpointed, fused_backward_pass=fused, bucketing=False, class_image_steps=4,
                       class_image_batch_size=2, sample_every=steps, num_sample_images=1, sample_steps=4,
                       save_dtype="fp16", learning_rate=1e-6 if mode == "full" else 1e-4, seed=1)


def _reloads_and_generates(path: str, cfg, work: Path, device) -> bool:
    """The written file loads, holds finite numbers, and the model it gives draws a finite image."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from dreambooth_ext.bridge import single_file_to_diffusers
    from dreambooth_ext.train.inference import decode_latents
    from dreambooth_ext.train.lora_export import apply_webui_lora, load_webui_lora
    from dreambooth_ext.train.models import load_bundle, make_pipeline, open_base

    state = load_file(path)
    if not all(torch.isfinite(v.float()).all() for v in state.values()):
        return False
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if "Lora" in Path(path).parts:
        bundle = open_base(cfg.checkpoint, cfg.workspace_path(), cfg.family, progress=lambda _m: None,
                           dtypes={"unet": dtype, "vae": dtype, "text_encoder": dtype})
        apply_webui_lora(bundle.unet, [], load_webui_lora(path), bundle.family)
    else:
        folder = work / "reloaded"
        single_file_to_diffusers(Path(path), folder, overwrite=True)
        bundle = load_bundle(folder, dtype)
    bundle.vae.to(torch.float32)  # the WebUI's --no-half-vae: a half SD VAE may overflow
    pipe = make_pipeline(bundle).to(device)
    with torch.no_grad():
        latents = pipe("a sks_pixarstyle character", num_inference_steps=2, height=cfg.resolution,
                       width=cfg.resolution, generator=torch.Generator().manual_seed(0), output_type="latent").images
        # decoded as the product decodes: half latents cast to the fp32 VAE first
        image = np.asarray(decode_latents(pipe, latents)[0], dtype=np.float32)
    del pipe, bundle
    return bool(torch.isfinite(latents).all()) and float(image.std()) > 0  # a NaN decodes to a flat picture


def run_row(base: Path, work: Path, case, precision: str, attention: str, steps: int, check_reload: bool,
            resolution: Optional[int] = None) -> Row:
    import torch

    from dreambooth_ext.train.memory import estimate_for_config
    from dreambooth_ext.train.precision import resolve_mixed_precision
    from dreambooth_ext.train.reporter import Reporter
    from dreambooth_ext.train.run import train

    name, family, mode, case_resolution, checkpointed, fused, *chosen = case
    resolution = resolution or case_resolution
    cuda = torch.cuda.is_available()
    eight_bit = mode == "full" and not fused and cuda and _importable("bitsandbytes")
    optimizer = chosen[0] if chosen else "adamw8bit" if eight_bit else "adamw"
    row = Row(name, precision, attention, optimizer)
    run_name = f"{name}-{precision}-{attention}"
    cfg = _config(base, work, run_name, family, mode, resolution, checkpointed, precision, attention, optimizer, steps,
                  fused)
    device = torch.device("cuda" if cuda else "cpu")
    resolved, _ = resolve_mixed_precision(precision, device)
    estimate = estimate_for_config(cfg, family, resolved)
    row.estimate_gb = round(estimate.total / 2**30, 2)
    row.estimate_train_gb = round(estimate.training_peak / 2**30, 2)

    class Timer(Reporter):
        times: List[float] = []
        losses: List[float] = []
        outputs: List[str] = []
        peaks: dict = {}  # phase -> peak allocated bytes
        phase = "start"

        def _enter(self, phase: str) -> None:
            if cuda:  # the peak since the last mark belongs to the phase that was running
                peak = torch.cuda.max_memory_allocated()
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak)
                torch.cuda.reset_peak_memory_stats()
            self.phase = phase

        def stage(self, text, done=None, total=None):
            self._enter((text.split() or ["?"])[0])

        def progress(self, step, total, loss, lr):
            self._enter("training")
            self.times.append(time.perf_counter())
            self.losses.append(loss)

        def output(self, path, kind):
            if kind in ("checkpoint", "lora"):
                self.outputs.append(path)

    reporter = Timer()
    started = time.perf_counter()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        train(cfg, reporter)
        if cuda:
            row.peak_reserved_gb = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            reporter._enter("end")
            phase, peak = max(reporter.peaks.items(), key=lambda kv: kv[1])
            row.peak_allocated_gb, row.peak_phase = round(peak / 2**30, 2), phase
            row.train_peak_gb = round(reporter.peaks.get("training", float("nan")) / 2**30, 2)
        timed = reporter.times[3:] if len(reporter.times) > 4 else reporter.times
        if len(timed) > 1:
            row.it_per_s = round((len(timed) - 1) / (timed[-1] - timed[0]), 2)
        row.loss_finite = bool(reporter.losses) and all(math.isfinite(v) for v in reporter.losses)
        if check_reload and reporter.outputs:
            row.reloads_and_generates = all(_reloads_and_generates(p, cfg, work, device) for p in reporter.outputs)
    except Exception as e:  # noqa: BLE001 - one failed row must not hide the others
        row.error = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    row.seconds = round(time.perf_counter() - started, 1)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:g}"
    return str(value)


def print_table(rows: List[Row]) -> None:
    head = ["case", "precision", "attention", "optimizer", "it/s", "peak alloc GB", "in", "train peak GB",
            "peak reserved GB", "estimate GB", "est train GB", "est/train", "loss finite", "reload+generate", "s", "error"]
    lines = [head]
    for r in rows:
        ratio = r.estimate_train_gb / r.train_peak_gb if r.train_peak_gb == r.train_peak_gb and r.train_peak_gb else float("nan")
        lines.append([r.case, r.precision, r.attention, r.optimizer, _fmt(r.it_per_s), _fmt(r.peak_allocated_gb),
                      r.peak_phase or "-", _fmt(r.train_peak_gb),
                      _fmt(r.peak_reserved_gb), _fmt(r.estimate_gb), _fmt(r.estimate_train_gb), _fmt(round(ratio, 2)), _fmt(r.loss_finite),
                      _fmt(r.reloads_and_generates), _fmt(r.seconds), r.error])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip(), flush=True)


@contextlib.contextmanager
def _env(name: str, value: Optional[str]):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def main(argv=None) -> List[Row]:
    parser = argparse.ArgumentParser(description="Train real-size random-weight models for a few steps on the GPU.")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU with the bf16 stand-in")
    parser.add_argument("--steps", type=int, default=None, help="steps per row (default 20; 3 in a dry run)")
    parser.add_argument("--only", default="", help="comma-separated case names: " + ", ".join(c[0] for c in CASES))
    parser.add_argument("--precisions", default="bf16,fp16")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no new row starts")
    parser.add_argument("--work", default="", help="folder for models and outputs (default: a temporary one)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    import torch

    from dreambooth_ext.train.placement import EMULATE_ENV

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible; run with --dry-run for the CPU stand-in.", file=sys.stderr)
        raise SystemExit(2)
    steps = args.steps or (3 if args.dry_run else 20)
    cases = [c for c in CASES if not args.only or c[0] in args.only.split(",")]
    precisions = ["bf16"] if args.dry_run else [p for p in args.precisions.split(",") if p]
    attentions = ["sdpa"] + (["xformers"] if torch.cuda.is_available() and _importable("xformers.ops") else [])
    if torch.cuda.is_available():
        print(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
              f"attention {', '.join(attentions)}, bitsandbytes {'yes' if _importable('bitsandbytes') else 'no'}", flush=True)
    # most important first: every case once in bf16 with SDPA, then the other precisions, then xformers
    plan = [(c, p, a) for a in attentions for p in precisions for c in cases]
    started = time.perf_counter()
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as tmp, _env(EMULATE_ENV, "bf16" if args.dry_run else None):
        work = Path(args.work or tmp)
        bases = {}
        checked = set()
        for case, precision, attention in plan:
            if time.perf_counter() - started > args.budget:
                rows.append(Row(case[0], precision, attention, error="skipped: time budget spent"))
                continue
            if case[5] and precision == "fp16":  # refused by the trainer: the loss scaler sees all gradients
                rows.append(Row(case[0], precision, attention, error="skipped: the fused pass needs bf16"))
                continue
            family = case[1]
            if family not in bases:
                t0 = time.perf_counter()
                bases[family] = build_base(family, work / f"base-{family}", tiny=args.dry_run)
                print(f"built a random-weight {'tiny ' if args.dry_run else ''}{family} model in {time.perf_counter() - t0:.0f} s", flush=True)
            row = run_row(bases[family], work, case, precision, attention, steps, check_reload=case[0] not in checked,
                          resolution=64 if args.dry_run else None)
            checked.add(case[0])
            rows.append(row)
            print(f"{row.case} {row.precision} {row.attention}: {row.seconds} s {row.error}", flush=True)
    print_table(rows)
    if args.dry_run:
        print("dry run: tiny models at 64 px on the CPU; estimates are for the real-size model at 64 px")
    print(f"gpu-check: {time.perf_counter() - started:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    rows = main()
    sys.exit(0 if all(not r.error and r.loss_finite and r.reloads_and_generates is not False for r in rows) else 1)

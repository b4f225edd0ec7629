"""Ours against diffusers' examples/dreambooth/train_dreambooth.py (train_dreambooth_lora.py with
--mode lora), run the way a user runs each.

Ours trains from the single file (`python -m dreambooth_ext train --checkpoint X.safetensors`, its
conversion included); the peer trains from a diffusers folder of the same weights. Same instance and
class images, steps, resolution, batch 1, prior preservation on, AdamW in fp32, one thread each,
interleaved A B A B. With --generate-class both start from an empty class folder and
draw the class images themselves (50 steps, CFG 7.5, 4 at a time: the peer's defaults). Per tool: min/median CPU seconds (user + system of the process), wall seconds,
seconds to the first step (wall, when its progress bar first shows step 1) and peak RSS, with ratios.

Then, for full training, the steady step: ours (CPU ms per step after warm-up, through the trainer's API) against a bare
UNet forward + backward + fused AdamW loop on latents and embeddings of the same shapes (instance +
class in one batch, as ours and the peer do).

The peer scripts are not part of this repository. Get them from diffusers' repository at the tag of the
installed diffusers (0.31.0): examples/dreambooth/train_dreambooth.py, and train_dreambooth_lora.py
beside it for --mode lora (rank 4 on the attention projections for both), e.g.
    git clone --depth 1 --branch v0.31.0 https://github.com/huggingface/diffusers
It imports torchvision, and diffusers' training_utils needs a transformers with
`integrations.deepspeed` (the Forge pins' 4.46 has it, the WebUI's 4.30 does not): run this bench
with that Python (then ours and the peer share every library) or give --peer-python. Where no
torchvision build matches the installed torch (here: torch 2.13+cpu; PyPI's torchvision 0.28 needs
CUDA torch and fails to import), --peer-pythonpath can name a folder holding a stand-in `torchvision`
package with the few transforms the script uses (Compose, Resize, CenterCrop, RandomCrop, ToTensor,
Normalize); say so beside any figure measured that way. Without a runnable peer its rows are skipped
with the reason, and the bare loop is the reference.

    .venv-forge/bin/python bench/side_by_side.py --peer diffusers/examples/dreambooth/train_dreambooth.py

Usage: python bench/side_by_side.py [--peer PATH] [--peer-python PY] [--kind tiny|mid] [--steps N]
       [--repeats 3] [--mode full|lora] [--generate-class]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INSTANCE_PROMPT = "a photo of sks_pixarstyle character"
CLASS_PROMPT = "a photo of a character"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "DIFFUSERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_timed(cmd, first_step_pattern: str, cwd=None, pythonpath: str = ""):
    """Run `cmd`; (CPU s, wall s, s to the first step or None, peak RSS bytes, rc, last output)."""
    env = {**os.environ, **ONE_THREAD}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    seen = {"first": None, "tail": b""}
    pattern = re.compile(first_step_pattern.encode())

    def read():
        buf = b""
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            buf = (buf + chunk)[-20000:]
            if seen["first"] is None and pattern.search(buf):
                seen["first"] = time.perf_counter() - start
        seen["tail"] = buf

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    reader.join(timeout=5)
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    cpu = usage.ru_utime + usage.ru_stime
    return cpu, wall, seen["first"], usage.ru_maxrss * 1024, rc, seen["tail"].decode(errors="replace")[-1500:]


def peer_problem(python: str, peer: str, pythonpath: str = ""):
    """Why the peer cannot run with `python` (a missing import), or None."""
    if not peer:
        return "no --peer script given"
    if not Path(peer).is_file():
        return f"{peer} does not exist"
    check = "import torchvision.transforms, diffusers.training_utils"
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, env=env)
    return None if out.returncode == 0 else f"{python} cannot run it: {out.stderr.strip().splitlines()[-1][-200:]}"


def setup(kind: str, tmp: Path, num_class: int, resolution: int):
    """A single file, the same weights as a diffusers folder, instance images and ready class images
    (num_class 0: an empty class folder)."""
    from PIL import Image

    from bench.train_speed import DEMO, mid_family
    from dreambooth_ext.tiny import build_models, save_diffusers, single_file_from_models, tiny_family

    fam = tiny_family("sd1") if kind == "tiny" else mid_family()
    models = build_models(fam, 0)
    ck = single_file_from_models(fam, models, tmp / f"{kind}.safetensors")
    folder = save_diffusers(fam, models, tmp / f"{kind}-diffusers")
    unet_config = folder / "unet" / "config.json"  # the peer draws class images at sample_size x 8 px
    unet_config.write_text(unet_config.read_text().replace(f'"sample_size": {fam["unet"]["sample_size"]}',
                                                           f'"sample_size": {resolution // 8}'))
    from safetensors.torch import load_file, save_file

    te = folder / "text_encoder" / "model.safetensors"  # transformers' from_pretrained wants its format tag
    save_file(load_file(str(te)), str(te), metadata={"format": "pt"})
    instance = tmp / "instance"
    instance.mkdir()
    for p in sorted(DEMO.glob("*.png")):  # images only: the peer reads every file in the folder as an image
        Image.open(p).convert("RGB").resize((resolution, resolution)).save(instance / p.name)
    klass = tmp / "class"
    klass.mkdir()
    for i in range(num_class):  # the same ready-made class images for both: neither generates
        Image.effect_noise((resolution, resolution), 40 + i).convert("RGB").save(klass / f"{i}.png")
    return ck, folder, instance, klass


GENERATION = {"steps": 50, "guidance": 7.5, "batch": 4}  # the peer's pipeline defaults and --sample_batch_size
LORA_RANK = 4  # the peer's default --rank; its adapters sit on the attention projections


def ours_cmd(ck, instance, klass, work, steps, res, num_class, mode="full", class_steps=GENERATION["steps"],
             more=()):
    extra = [*more, "--class-image-steps", str(class_steps), "--class-image-guidance", str(GENERATION["guidance"]),
             "--class-image-batch-size", str(GENERATION["batch"])]
    if mode == "lora":
        extra += ["--train-mode", "lora", "--lora-rank", str(LORA_RANK), "--lora-targets", "attention",
                  "--lora-learning-rate", "5e-6"]
    return [sys.executable, "-m", "dreambooth_ext", "train", "--checkpoint", str(ck), "--name", "side",
            "--models-dir", str(work), "--instance-dir", str(instance), "--instance-prompt", INSTANCE_PROMPT,
            "--class-prompt", CLASS_PROMPT, "--class-dir", str(klass), "--num-class-images", str(num_class),
            "--prior-loss-weight", "1.0", "--resolution", str(res), "--max-steps", str(steps),
            "--train-batch-size", "1", "--optimizer", "adamw", "--mixed-precision", "no", "--learning-rate", "5e-6",
            "--lr-scheduler", "constant", "--no-bucketing", "--no-hflip", "--center-crop", "--seed", "1", *extra]


def peer_cmd(python, peer, folder, instance, klass, work, steps, res, num_class, mode="full"):
    if mode == "lora":
        peer = str(Path(peer).with_name("train_dreambooth_lora.py"))
    extra = ["--rank", str(LORA_RANK)] if mode == "lora" else []
    return [python, peer, "--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(instance),
            "--class_data_dir", str(klass), "--with_prior_preservation", "--prior_loss_weight", "1.0",
            "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT, "--num_class_images",
            str(num_class), "--resolution", str(res), "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--learning_rate", "5e-6", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--mixed_precision", "no", "--center_crop", "--seed", "1", "--output_dir", str(work),
            "--checkpointing_steps", str(10 ** 9), "--sample_batch_size", str(GENERATION["batch"]), *extra]


def ours_steady(ck, instance, klass, work, steps, res, num_class):
    """Our CPU ms per step after two warm-up steps, through the trainer's API (run in a child), with every
    latent cached before the first step so that no step pays for encoding."""
    code = f"""
import sys, time; sys.path.insert(0, {str(ROOT)!r})
from dreambooth_ext.train.config import Concept, TrainConfig
from dreambooth_ext.train.reporter import Reporter
from dreambooth_ext.train import run
from dreambooth_ext.train.run import train
run.ENCODE_AT_FIRST_USE_ON_CPU = False
class T(Reporter):
    times = []
    def progress(self, *a): self.times.append(time.process_time())
    def stage(self, *a, **k): pass
    def warn(self, *a): pass
c = Concept(instance_dir={str(instance)!r}, instance_prompt={INSTANCE_PROMPT!r}, class_prompt={CLASS_PROMPT!r},
            class_dir={str(klass)!r}, num_class_images={num_class})
cfg = TrainConfig(checkpoint={str(ck)!r}, name="steady", models_dir={str(work)!r}, concepts=[c], resolution={res},
                  max_steps={steps}, bucketing=False, hflip=False, center_crop=True, learning_rate=5e-6, seed=1,
                  mixed_precision="no")
t = T(); train(cfg, t)
print((t.times[-1] - t.times[2]) / (len(t.times) - 3) * 1000)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **ONE_THREAD})
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def bare_steady(folder, steps, res):
    """CPU ms per step of a bare UNet fwd+bwd+AdamW loop, batch 2 (instance + class), in a child:
    without and with gradient clipping at 1.0 (ours and the peer clip by default); and the child's
    peak RSS in bytes (the UNet alone: no VAE, no text encoder)."""
    code = f"""
import resource, time, torch, inspect
from diffusers import UNet2DConditionModel
unet = UNet2DConditionModel.from_pretrained({str(folder)!r}, subfolder="unet")
unet.train()
fused = "fused" in inspect.signature(torch.optim.AdamW.__init__).parameters
opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, **({{"fused": True}} if fused else {{}}))
g = torch.Generator().manual_seed(0)
x = torch.randn(2, unet.config.in_channels, {res // 8}, {res // 8}, generator=g)
emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
def loop(clip):
    times = []
    for i in range({steps}):
        t = torch.randint(0, 1000, (2,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        pred = unet(x + noise, t, emb).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.process_time())
    return (times[-1] - times[2]) / (len(times) - 3) * 1000
print(loop(False), loop(True), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **ONE_THREAD})
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return [float(v) for v in out.stdout.strip().splitlines()[-1].split()]


def _row(name, runs):
    cpu = [r[0] for r in runs]
    wall = [r[1] for r in runs]
    first = [r[2] for r in runs if r[2] is not None]
    rss = [r[3] for r in runs]
    f = f"{min(first):6.1f} {statistics.median(first):6.1f}" if first else "     -      -"
    print(f"{name:6} {min(cpu):7.1f} {statistics.median(cpu):7.1f} {min(wall):7.1f} {statistics.median(wall):7.1f} "
          f"{f} {max(rss) / 2**20:8.0f}")
    return statistics.median(cpu), statistics.median(wall), (statistics.median(first) if first else None), max(rss)


def _fresh_class_dir(tmp: Path, ready: Path, name: str, generate: bool) -> Path:
    """The shared ready-made class folder, or an empty one per run so each run draws its own."""
    if not generate:
        return ready
    folder = tmp / f"class-{name}"
    folder.mkdir()
    return folder


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", default="", help="path of diffusers' examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--peer-pythonpath", default="", help="prepended to the peer's PYTHONPATH only")
    parser.add_argument("--kind", choices=["tiny", "mid"], default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="default: 100 tiny, 10 mid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--class-images", type=int, default=10)
    parser.add_argument("--mode", choices=["full", "lora"], default="full")
    parser.add_argument("--generate-class", action="store_true", help="both draw their class images")
    parser.add_argument("--our-class-steps", type=int, default=GENERATION["steps"],
                        help="sampling steps of our class images (the peer's are fixed at 50; our default is 30)")
    parser.add_argument("--ours-arg", action="append", default=[],
                        help="one more argument of our run, e.g. --ours-arg=--fused-backward-pass (repeatable)")
    args = parser.parse_args()
    steps = args.steps or (100 if args.kind == "tiny" else 10)
    res = 64 if args.kind == "tiny" else 256
    peer = str(Path(args.peer).with_name("train_dreambooth_lora.py")) if args.mode == "lora" and args.peer else args.peer
    problem = peer_problem(args.peer_python, peer, args.peer_pythonpath)
    steps_each = (f"{GENERATION['steps']} steps" if args.our_class_steps == GENERATION["steps"] else
                  f"ours {args.our_class_steps} steps, the peer's {GENERATION['steps']}")
    made = (f"generated by each ({steps_each}, CFG {GENERATION['guidance']}, {GENERATION['batch']} at a "
            "time)") if args.generate_class else "ready"
    what = f"LoRA rank {LORA_RANK} on attention" if args.mode == "lora" else "full"
    print(f"{args.kind} SD1 pattern, {res} px, {what}, {steps} steps, batch 1 + prior preservation "
          f"({args.class_images} class images, {made}), AdamW fp32, 1 thread each, {args.repeats} interleaved repeats"
          + (f"; ours with {' '.join(args.ours_arg)}" if args.ours_arg else ""))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck, folder, instance, klass = setup(args.kind, tmp, 0 if args.generate_class else args.class_images, res)
        runs = {"ours": [], "peer": []}
        for r in range(args.repeats):
            work = tmp / f"ours-{r}"
            class_dir = _fresh_class_dir(tmp, klass, f"ours-{r}", args.generate_class)
            out = run_timed(ours_cmd(ck, instance, class_dir, work, steps, res, args.class_images, args.mode,
                                     args.our_class_steps, args.ours_arg),
                            r"training:[^\r\n]*\|\s*1/\d+", cwd=ROOT)
            if out[4]:
                raise SystemExit(f"ours failed:\n{out[5]}")
            runs["ours"].append(out)
            if problem is None:
                class_dir = _fresh_class_dir(tmp, klass, f"peer-{r}", args.generate_class)
                out = run_timed(peer_cmd(args.peer_python, args.peer, folder, instance, class_dir, tmp / f"peer-{r}",
                                         steps, res, args.class_images, args.mode), r"Steps:[^\r\n]*\|\s*1/\d+",
                                pythonpath=args.peer_pythonpath)
                if out[4]:
                    raise SystemExit(f"the peer failed:\n{out[5]}")
                runs["peer"].append(out)
        print(f"{'':6} {'CPU s':>15} {'wall s':>15} {'1st step s':>13} {'peak RSS':>8}")
        print(f"{'':6} {'min':>7} {'median':>7} {'min':>7} {'median':>7} {'min':>6} {'median':>6} {'MiB':>8}")
        ours = _row("ours", runs["ours"])
        if problem is None:
            peer = _row("peer", runs["peer"])
            ratio = [p / o if o else float("nan") for o, p in zip(ours[:2], peer[:2])]
            first = f"{ours[2] / peer[2]:.2f}x theirs" if ours[2] and peer[2] else "-"
            print(f"ours is {ratio[0]:.2f}x faster in CPU time, {ratio[1]:.2f}x in wall time; first step at "
                  f"{first}; peak RSS {ours[3] / peer[3]:.2f}x theirs")
        else:
            print(f"peer not run: {problem}")
        if args.mode != "full":
            return
        mine = ours_steady(ck, instance, klass, tmp / "steady", max(steps, 8), res, args.class_images)
        bare, clipped, bare_rss = bare_steady(folder, max(steps, 8), res)
        print(f"steady step (CPU ms): ours {mine:.1f}; bare UNet fwd+bwd+AdamW loop {bare:.1f} "
              f"({clipped:.1f} with clipping at 1.0, as ours and the peer by default): ours runs at "
              f"{bare / mine * 100:.0f}% of the bare loop's speed ({clipped / mine * 100:.0f}% of the clipped one)")
        peer_share = f", {bare_rss / peer[3]:.2f}x the peer's" if problem is None else ""
        print(f"peak RSS of the bare loop (the UNet, its gradients and AdamW states, no VAE or text encoder): "
              f"{bare_rss / 2**20:.0f} MiB{peer_share}; ours {ours[3] / bare_rss:.2f}x it")


if __name__ == "__main__":
    main()

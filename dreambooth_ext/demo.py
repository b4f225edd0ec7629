"""`./run.sh demo`: the main job on a built-in default, on a CPU, with nothing downloaded.

Installs the shipped tiny drawn base (a small SD1 that learned coloured shapes and simple
characters, tools/build_tiny_base.py), DreamBooth-trains it on the bundled `sks_pixarstyle`
character (drawn by tools/draw_demo_images.py, which the base has never seen) with prior
preservation, writes the checkpoint where the WebUI looks, and saves a labelled before/after grid
(the same seeds before and after, for the instance prompt, the class prompt and an unrelated
caption), a loss plot and the monitor's figures. A few minutes on 2 cores.
"""

import json
import time
from collections import Counter
from pathlib import Path

DEMO_IMAGES = Path(__file__).resolve().parent / "data" / "demo" / "instance"
TOKEN_PROMPT = "a sks_pixarstyle character"
CLASS_PROMPT = "a character"
UNRELATED_PROMPT = "a red circle"
SEEDS = [11, 12, 13, 14, 15, 16]
RESOLUTION = 64
SAMPLE_STEPS = 20
# Classifier-free guidance for the class images, the samples and the grid. The base was trained with caption
# dropout: at 3 it draws each caption's shape in its colour (16 of 17 captions); 5 moves the trained token's
# samples further from the character (mean latent distance 12.3 against 10.6).
GUIDANCE = 3.0
# The demo's settings for the tiny base, chosen by looking at the grid: at 400 steps of lr 1e-4 the token draws
# the orange figure under a red hat on a coloured background in every seed, the class row keeps its hatted
# characters, and "a red circle" stays a red circle but takes the instances' backgrounds (2e-4 looked the
# same with more drift; 800 steps of 5e-4, the settings of an earlier base, smear everything into red).
TRAIN = dict(max_steps=400, learning_rate=1e-4)
INSTANCE_LABEL = "the sks_pixarstyle character"
FIGURES = "figures.json"
FIGURE_KEYS = {"to_instances", "drift", "looks_like"}
GRID, LOSS_PLOT = "before_after.png", "loss.png"
# A PNG text chunk the demo puts in its pictures: a picture in --out without it is not the demo's to replace.
MARK = "dreambooth_ext_demo"


def demo_config(models: Path, base: Path):
    from dreambooth_ext.tiny_base import short_hash
    from dreambooth_ext.train.config import Concept, TrainConfig

    concept = Concept(instance_dir=str(DEMO_IMAGES), instance_prompt=TOKEN_PROMPT, class_prompt=CLASS_PROMPT,
                      num_class_images=12)
    # class images belong to the base that drew them: a rebuilt base gets a folder of its own
    concept.class_dir = str(models / "dreambooth" / "sks_pixarstyle-demo" / f"class_images-{short_hash(base)}")
    # under a minute on 2 cores: 400 steps, 12 class images and the grid's 36 pictures at 64 px
    return TrainConfig(checkpoint=str(base), name="sks_pixarstyle-demo", models_dir=str(models), concepts=[concept],
                       resolution=RESOLUTION, bucketing=False, **TRAIN,
                       class_image_steps=SAMPLE_STEPS, class_image_guidance=GUIDANCE, sample_every=100,
                       sample_steps=SAMPLE_STEPS, sample_guidance=GUIDANCE, num_sample_images=2, save_dtype="fp32")


def _one_thread_unless_told() -> None:
    """The tiny model's operations are too small to gain from more threads; on a busy 2-core machine a
    second thread stalls every step (800 steps: 100 s on one thread, over 6 minutes on two)."""
    import os

    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)


def run_demo(out: Path, models: Path = Path("models")) -> int:
    from dreambooth_ext.atomic import write_text
    from dreambooth_ext.plot import loss_plot
    from dreambooth_ext.tiny_base import NAME, install, is_current
    from dreambooth_ext.train.reporter import ConsoleReporter
    from dreambooth_ext.train.run import train

    out, models = Path(out), Path(models)
    check_outputs(out)  # before any work: a refusal leaves nothing half done
    out.mkdir(parents=True, exist_ok=True)
    _one_thread_unless_told()
    t0 = time.time()
    base = models / "Stable-diffusion" / f"{NAME}.safetensors"
    if not is_current(base):  # missing, or an earlier build of the base
        install(base)
    print(f"base model: {base} (tiny SD1 trained on drawn shapes and characters, with "
          f"{base.with_suffix('.yaml').name} beside it)")
    cfg = demo_config(models, base)
    reporter = ConsoleReporter()
    try:
        result = train(cfg, reporter)
    finally:
        reporter.close()
    if result.status != "finished":
        print(f"stopped at step {result.step}; run `./run.sh demo` again to resume")
        return 3
    check_outputs(out)  # again: the folder may have changed while it trained
    grid, figures = before_after(cfg, Path(result.outputs[0]), out / GRID)
    save_marked_png(loss_plot(result.losses), out / LOSS_PLOT)
    print(f"\ntrained {result.step} steps; whole demo {time.time() - t0:.0f} s")
    print(f"checkpoint for the WebUI: {result.outputs[0]}")
    print(f"before/after grid (seeds {SEEDS}): {grid}")
    print("mean latent distance of the samples to the nearest instance picture (lower = more like the character):")
    for prompt, (before, after) in figures["to_instances"].items():
        print(f"  '{prompt}': base {before:.1f} -> trained {after:.1f}")
    print("how far the trained model's samples moved from the base's, same seeds (drift; the concept itself is "
          f"{figures['to_instances'][TOKEN_PROMPT][0]:.1f} away):")
    for prompt, drift in figures["drift"].items():
        print(f"  '{prompt}': {drift:.1f}")
    print(f"what the {len(SEEDS)} samples look like most (nearest of the instance pictures and 8 drawn pictures of each "
          "caption the base learned, compared at 16x16 pixels):")
    for prompt, (before, after) in figures["looks_like"].items():
        print(f"  '{prompt}': base {_counts(before)}; trained {_counts(after)}")
    write_text(out / FIGURES, json.dumps(figures, indent=1), what="the demo's figures")
    if result.best_step is not None:
        print(f"monitor's best step: {result.best_step} (figures in {cfg.workspace_path() / 'monitor.json'})")
    print(f"loss plot: {out / LOSS_PLOT}")
    print(f"samples during training, class images and resumable state: {cfg.workspace_path()}")
    return 0


def check_outputs(out: Path) -> None:
    """Refuse to run when --out holds a file the demo would replace and did not write: a figures.json
    without the demo's keys, or a grid or loss plot without the demo's mark (a user's picture, or one
    from a demo before the mark existed)."""
    from dreambooth_ext.errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder for the demo's pictures and figures.")
    foreign = [p for p in (out / FIGURES, out / GRID, out / LOSS_PLOT) if p.exists() and not _is_ours(p)]
    if foreign:
        names = ", ".join(p.name for p in foreign)
        raise UserError(f"{out} holds {names}, which the demo did not write and would replace; choose another "
                        "--out folder (or, if an earlier version of the demo wrote them, delete them).")


def _is_ours(path: Path) -> bool:
    try:
        if path.suffix == ".json":
            return set(json.loads(path.read_text(encoding="utf-8"))) == FIGURE_KEYS
        from PIL import Image

        with Image.open(path) as img:
            return img.format == "PNG" and getattr(img, "text", {}).get(MARK) == path.name
    except (OSError, ValueError, TypeError, SyntaxError):  # unreadable, not JSON, not a picture: not the demo's
        return False


def save_marked_png(image, path: Path) -> Path:
    """Write a demo picture atomically, marked as the demo's so the next run may replace it."""
    from PIL.PngImagePlugin import PngInfo

    from dreambooth_ext.atomic import write_png

    info = PngInfo()
    info.add_text(MARK, path.name)
    return write_png(path, image, info, "the demo's picture")


def before_after(cfg, trained: Path, path: Path):
    """A labelled grid: the instance pictures, then base and trained rows for each prompt (same seeds);
    and the latent figures behind it."""
    import torch

    from dreambooth_ext.bridge import single_file_to_diffusers
    from dreambooth_ext.drawn import nearest_labels
    from dreambooth_ext.evaluate import image_latents, mean_nearest_distance, paired_distance, pixel_latents
    from dreambooth_ext.train.images import list_images, load_image
    from dreambooth_ext.train.models import load_bundle, make_pipeline, open_base

    folder = cfg.workspace_path() / "trained-diffusers"
    single_file_to_diffusers(trained, folder, overwrite=True, progress=lambda _m: None)
    paths = list_images(DEMO_IMAGES)[0]
    instances = [load_image(p).resize((RESOLUTION, RESOLUTION)) for p in paths]
    rows = [("instance pictures", instances[:len(SEEDS)])]
    pictures, latents = {}, {}
    for label in ("base", "trained"):
        bundle = (open_base(cfg.checkpoint, cfg.workspace_path(), cfg.family, progress=lambda _m: None)
                  if label == "base" else load_bundle(folder))
        pipe = make_pipeline(bundle)
        for prompt in (TOKEN_PROMPT, CLASS_PROMPT, UNRELATED_PROMPT):
            pictures[label, prompt] = [
                pipe(prompt, num_inference_steps=SAMPLE_STEPS, height=RESOLUTION, width=RESOLUTION,
                     guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed)).images[0]
                for seed in SEEDS]
            latents[label, prompt] = pixel_latents(bundle, pictures[label, prompt])
        if label == "base":
            references = image_latents(bundle, paths, RESOLUTION)
            rows.append(("instance pictures through the base's VAE (the most any model on this base can draw)",
                         decoded(bundle, references[:len(SEEDS)])))
    for prompt in (TOKEN_PROMPT, CLASS_PROMPT, UNRELATED_PROMPT):
        for label in ("base", "trained"):
            rows.append((f"{label}: {prompt}", pictures[label, prompt]))
    figures = {"to_instances": {}, "drift": {}, "looks_like": {}}
    for prompt in (TOKEN_PROMPT, CLASS_PROMPT, UNRELATED_PROMPT):
        figures["looks_like"][prompt] = tuple(nearest_labels(pictures[k, prompt], {INSTANCE_LABEL: instances})
                                              for k in ("base", "trained"))
        figures["to_instances"][prompt] = tuple(mean_nearest_distance(latents[k, prompt], references)
                                                for k in ("base", "trained"))
        figures["drift"][prompt] = paired_distance(latents["trained", prompt], latents["base", prompt])
    return labelled_grid(rows, path), figures


def _counts(labels) -> str:
    """'5 the sks_pixarstyle character, 1 "a character"': how many samples look like what."""
    named = [(n, label if label == INSTANCE_LABEL else f'"{label}"') for label, n in Counter(labels).most_common()]
    return ", ".join(f"{n} {label}" for n, label in named)


def decoded(bundle, latents):
    """Pictures for scaled latents, through the bundle's VAE decoder."""
    import torch
    from PIL import Image

    from dreambooth_ext.vae_io import vae_input

    with torch.no_grad():
        pixels = bundle.vae.decode(vae_input(latents, bundle.vae) / bundle.vae_scale).sample.clamp(-1, 1)
    return [Image.fromarray(((p + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for p in pixels]


def labelled_grid(rows, path: Path, zoom: int = 2) -> Path:
    """Rows of pictures, each with its label on the left, enlarged `zoom` times for reading."""
    from PIL import Image, ImageDraw, ImageFont

    cell = RESOLUTION * zoom
    label_w, gap = 230, 4
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + cols * (cell + gap), len(rows) * (cell + gap)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for r, (label, images) in enumerate(rows):
        y = r * (cell + gap)
        for line, text in enumerate(_wrap(label, 34)):
            draw.text((6, y + cell // 2 - 12 + 12 * line), text, fill=(20, 20, 20), font=font)
        for c, img in enumerate(images):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + c * (cell + gap), y))
    return save_marked_png(grid, path)


def _wrap(text: str, width: int):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]

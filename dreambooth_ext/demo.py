"""`./run.sh demo`: the main job on a built-in default, on a CPU, with nothing downloaded.

Builds the tiny base model, DreamBooth-trains it on the bundled `sks_pixarstyle` character (drawn
by tools/draw_demo_images.py) with prior preservation, writes the checkpoint where the WebUI
looks, and saves a before/after grid and a loss plot. A few minutes on 2 cores.
"""

import time
from pathlib import Path

DEMO_IMAGES = Path(__file__).resolve().parent / "data" / "demo" / "instance"
TOKEN_PROMPT = "a sks_pixarstyle character"
CLASS_PROMPT = "a pixar-style character"
SEEDS = [11, 12, 13, 14]


def demo_config(models: Path, base: Path):
    from dreambooth_ext.train.config import Concept, TrainConfig

    concept = Concept(instance_dir=str(DEMO_IMAGES), instance_prompt=TOKEN_PROMPT, class_prompt=CLASS_PROMPT,
                      num_class_images=8)
    return TrainConfig(checkpoint=str(base), name="sks_pixarstyle-demo", models_dir=str(models), concepts=[concept],
                       resolution=128, max_steps=200, learning_rate=1e-3, bucketing=False, class_image_steps=10,
                       class_image_guidance=1.0, sample_every=100, sample_steps=10, sample_guidance=1.0,
                       num_sample_images=2, save_dtype="fp32")


def run_demo(out: Path, models: Path = Path("models")) -> int:
    from dreambooth_ext.plot import loss_plot
    from dreambooth_ext.tiny import write_tiny_checkpoint
    from dreambooth_ext.train.reporter import ConsoleReporter
    from dreambooth_ext.train.run import train

    out, models = Path(out), Path(models)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = models / "Stable-diffusion" / "tiny-sd1.safetensors"
    if not base.is_file():
        write_tiny_checkpoint("sd1", base, seed=0)
    print(f"base model: {base} (tiny random-weight SD1, with {base.with_suffix('.yaml').name} beside it)")
    cfg = demo_config(models, base)
    reporter = ConsoleReporter()
    try:
        result = train(cfg, reporter)
    finally:
        reporter.close()
    if result.status != "finished":
        print(f"stopped at step {result.step}; run `./run.sh demo` again to resume")
        return 3
    grid, distances = _before_after(cfg, Path(result.outputs[0]), out / "before_after.png")
    loss_plot(result.losses).save(out / "loss.png")
    print(f"\ntrained {result.step} steps in {time.time() - t0:.0f} s")
    print(f"checkpoint for the WebUI: {result.outputs[0]}")
    print(f"before/after samples ('{TOKEN_PROMPT}', seeds {SEEDS}): {grid}")
    print(f"mean latent distance of those samples to the nearest instance image: base {distances[0]:.1f}, "
          f"trained {distances[1]:.1f} (a random-weight VAE draws no recognisable pictures; this measures the pull)")
    print(f"loss plot: {out / 'loss.png'}")
    print(f"samples during training, class images and resumable state: {cfg.workspace_path()}")
    return 0


def _before_after(cfg, trained: Path, path: Path):
    """Rows: the instance images, the base model's samples, the trained model's (same prompt and seeds);
    and each model's mean latent distance from its samples to the nearest instance image."""
    import torch

    from dreambooth_ext.bridge import single_file_to_diffusers
    from dreambooth_ext.evaluate import generated_latents, image_latents, mean_nearest_distance
    from dreambooth_ext.train.images import list_images, load_image
    from dreambooth_ext.train.models import load_bundle, make_pipeline
    from dreambooth_ext.train.samples import save_grid

    rows = [load_image(p).resize((cfg.resolution, cfg.resolution)) for p in list_images(DEMO_IMAGES)[0][:len(SEEDS)]]
    folder = cfg.workspace_path() / "trained-diffusers"
    single_file_to_diffusers(trained, folder, overwrite=True, progress=lambda _m: None)
    distances = []
    for model in (cfg.workspace_path() / "base" / "model", folder):
        bundle = load_bundle(model)
        pipe = make_pipeline(bundle)
        for seed in SEEDS:
            rows.append(pipe(TOKEN_PROMPT, num_inference_steps=20, height=cfg.resolution, width=cfg.resolution,
                             guidance_scale=1.0, generator=torch.Generator().manual_seed(seed)).images[0])
        references = image_latents(bundle, list_images(DEMO_IMAGES)[0], cfg.resolution)
        samples = generated_latents(pipe, TOKEN_PROMPT, SEEDS, 20, cfg.resolution)
        distances.append(mean_nearest_distance(samples, references))
    return save_grid(rows, len(SEEDS), path), distances

"""`./run.sh demo`: the built-in default job on a tiny model, on a CPU, with nothing downloaded.

For now it shows the checkpoint bridge: it builds a tiny SD1-shaped checkpoint, converts it
to a diffusers folder and back, checks the round trip is bit-exact, and generates one image
from the converted folder.
"""

import time
from pathlib import Path


def run_demo(out: Path) -> int:
    import torch
    from safetensors.torch import load_file

    from dreambooth_ext.bridge import diffusers_to_single_file, single_file_to_diffusers
    from dreambooth_ext.tiny import write_tiny_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    src = write_tiny_checkpoint("sd1", out / "tiny-sd1.safetensors", seed=0)
    print(f"built a tiny SD1 checkpoint: {src} (+ {src.with_suffix('.yaml').name})")
    folder = out / "tiny-sd1-diffusers"
    report = single_file_to_diffusers(src, folder, overwrite=True, progress=print)
    back = diffusers_to_single_file(folder, out / "tiny-sd1-roundtrip.safetensors", progress=print)
    a, b = load_file(str(src)), load_file(back.path)
    exact = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    print(f"round trip {'bit-exact' if exact else 'DIFFERS'}: {len(a)} tensors ({report.family}, {report.prediction_type})")
    image_path = _generate(folder, out / "tiny-sd1-sample.png")
    print(f"generated {image_path} from the converted folder")
    print(f"done in {time.time() - t0:.1f} s; everything is in {out}")
    return 0 if exact else 1


def _generate(folder: Path, path: Path) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a sks_pixarstyle character", num_inference_steps=4, height=128, width=128,
                 generator=torch.Generator().manual_seed(0)).images[0]
    image.save(path)
    return path

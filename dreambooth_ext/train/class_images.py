"""Class images for prior preservation: generated with the base model when a class folder has too few.

    jobs = class_jobs_from_config(cfg)
    made = ensure_class_images(bundle, jobs, steps=30, guidance=7.0, batch_size=4, negative_prompt="",
                               resolution=512, seed=cfg.seed, progress=print_progress)

Images already in a folder (the user's own or an earlier run's) are counted first and kept. The
missing ones are named `class_<index>-<prompt hash>.png` with a `.txt` caption holding the prompt,
and each gets a seed derived from (seed, prompt, index), so a run that was stopped, asked for more,
or lost some files regenerates exactly the files that are missing: byte-identical on the same
device with the same batch size (see `_batches`), the same picture up to rounding otherwise.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from dreambooth_ext.atomic import write_png, write_text
from dreambooth_ext.bridge.temporaries import remove_stale
from dreambooth_ext.errors import UserError
from dreambooth_ext.train.derived import derived_seed, prompt_hash
from dreambooth_ext.train.images import list_images
from dreambooth_ext.train.inference import AutocastFactory, eval_mode, generate_images, pipeline_modules
from dreambooth_ext.train.models import ModelBundle, make_pipeline

NOT_IN_WEBUI = ("Setting 'class_image_generator' is 'webui', which works only inside the WebUI (it uses the WebUI's "
                "own txt2img); set it to 'builtin' here.")

Progress = Callable[[int, int, str], None]

_GENERATED = re.compile(r"^class_(\d{5,})-([0-9a-f]{8})\.png$")
_TMP_PREFIX = ".class_"  # hidden, so list_images never counts a half-written file


@dataclass
class ClassJob:
    """`count` images of `prompt` wanted in `folder`; steps, guidance and negative prompt of its own
    (a concept's class settings; None: the run's)."""

    prompt: str
    folder: Path
    count: int
    steps: Optional[int] = None
    guidance: Optional[float] = None
    negative_prompt: Optional[str] = None


def image_seed(seed: int, prompt: str, index: int) -> int:
    """A seed of its own for every class image, stable across runs and machines."""
    return derived_seed(seed, prompt, index, lines=True)


def class_image_name(prompt: str, index: int) -> str:
    return f"class_{index:05d}-{prompt_hash(prompt)}.png"


def class_jobs_from_config(cfg) -> List[ClassJob]:
    """One job per concept that uses prior preservation (a class prompt, images wanted, a loss weight)."""
    if cfg.prior_loss_weight <= 0:
        return []
    return [ClassJob(c.class_prompt.strip(), cfg.class_path(c), c.num_class_images, c.class_steps or None,
                     c.class_guidance or None, c.class_negative_prompt or None)
            for c in cfg.concepts if c.class_prompt.strip() and c.num_class_images > 0]


def merge_jobs(jobs: Iterable[ClassJob]) -> List[ClassJob]:
    """One job per (folder, prompt), asking for the largest count; first-seen order kept."""
    merged: Dict[Tuple[str, str], ClassJob] = {}
    for job in jobs:
        key = (str(Path(job.folder).resolve()), job.prompt)
        if key in merged:
            merged[key].count = max(merged[key].count, job.count)
        else:
            merged[key] = ClassJob(job.prompt, Path(job.folder), job.count, job.steps, job.guidance,
                                   job.negative_prompt)
    return list(merged.values())


def _existing(folder: Path, prompt: str) -> Tuple[int, set]:
    """Images that count for `prompt` in `folder`, and the indices its generated files already use.

    Files generated for another prompt sharing the folder do not count; any other image does.
    """
    if not folder.is_dir():
        return 0, set()
    own = prompt_hash(prompt)
    count, used = 0, set()
    for path in list_images(folder)[0]:
        match = _GENERATED.match(path.name)
        if match and match.group(2) != own:
            continue
        count += 1
        if match:
            used.add(int(match.group(1)))
    return count, used


def _missing_indices(folder: Path, job: ClassJob) -> List[int]:
    have, used = _existing(folder, job.prompt)
    wanted = max(0, job.count - have)
    # The lowest free indices: a deleted file is the first to come back, with its old seed.
    # A file of ours that no longer decodes is not in `used`, so it is overwritten with its own seed.
    out, index = [], 0
    while len(out) < wanted:
        if index not in used:
            out.append(index)
        index += 1
    return out


def _remove_stale_tmp(folder: Path) -> None:
    # Left by a run killed mid-write; never counted, but not worth keeping either.
    remove_stale(folder)
    for path in folder.glob(_TMP_PREFIX + "*.tmp"):  # the old temporaries' name (.NAME.tmp)
        try:
            path.unlink()
        except OSError:
            pass


def _save(image, folder: Path, prompt: str, index: int) -> Path:
    path = folder / class_image_name(prompt, index)
    # The caption first: an image that exists always has its caption beside it.
    write_text(path.with_suffix(".txt"), prompt + "\n", what="the class image")
    write_png(path, image, what="the class image")
    return path


def _pipeline(bundle: ModelBundle):
    pipe = make_pipeline(bundle)
    if getattr(pipe, "watermark", None) is not None:
        pipe.watermark = None  # an SDXL watermark in class images would be learned as part of the class
    return pipe


def _generate(pipe, prompt: str, seeds: List[int], *, steps: int, guidance: float, negative_prompt: str,
              resolution: int, autocast: Optional[AutocastFactory], text=None) -> list:
    generators = [torch.Generator().manual_seed(s) for s in seeds]  # CPU: the same noise on every device
    negative = [negative_prompt] * len(seeds) if negative_prompt else None
    return generate_images(pipe, autocast, text, prompt=[prompt] * len(seeds), negative_prompt=negative,
                           num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                           generator=generators)


def _prepare_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Could not create the class image folder {folder} ({e.strerror or e}); "
                        "check the path and its permissions.") from None
    _remove_stale_tmp(folder)


def _batches(plan, batch_size: int):
    """(job, folder, block, missing) per batch; a folder is made ready before its first batch.

    A batch is always the whole block of indices [k * batch_size, (k + 1) * batch_size), of which
    only the missing ones are saved: batched maths rounds differently from unbatched, so generating
    the same block again is what makes a deleted or not-yet-made file come back byte-identical.
    """
    for job, folder, missing in plan:
        _prepare_folder(folder)
        blocks: Dict[int, List[int]] = {}
        for index in missing:
            blocks.setdefault(index // batch_size, []).append(index)
        for k, wanted in blocks.items():
            yield job, folder, list(range(k * batch_size, (k + 1) * batch_size)), wanted


def ensure_class_images(bundle: ModelBundle, jobs: List[ClassJob], *, steps: int, guidance: float, batch_size: int,
                        negative_prompt: str, resolution: int, seed: int, progress: Optional[Progress] = None,
                        should_stop: Optional[Callable[[], bool]] = None,
                        autocast: Optional[AutocastFactory] = None, text=None) -> Dict[str, int]:
    """Generate the class images each job's folder lacks; return how many were made per folder.

    `autocast`: the run's mixed precision (half-precision maths, as diffusers generates class images in).
    `text`: conditioning.TextOptions, so long class prompts and clip skip read as in training.

    Stops between batches when `should_stop()` turns true; what was written is complete and kept.
    """
    if batch_size < 1:
        raise UserError(f"Setting 'class_image_batch_size' is {batch_size}; it must be at least 1.")
    merged = merge_jobs(jobs)
    made: Dict[str, int] = {str(Path(job.folder)): 0 for job in merged}
    plan = [(job, Path(job.folder), _missing_indices(Path(job.folder), job)) for job in merged]
    plan = [entry for entry in plan if entry[2]]
    total = sum(len(missing) for _, _, missing in plan)
    if not total:
        return made

    done = 0
    pipe = _pipeline(bundle)
    with eval_mode(pipeline_modules(pipe)), torch.no_grad():  # dropout off: the same seed must give the same image
        if progress:
            progress(0, total, f"Generating {total} class images")
        for job, folder, block, wanted in _batches(plan, batch_size):
            if should_stop and should_stop():
                break
            images = _generate(pipe, job.prompt, [image_seed(seed, job.prompt, i) for i in block],
                               steps=job.steps or steps, guidance=job.guidance or guidance,
                               negative_prompt=negative_prompt if job.negative_prompt is None else job.negative_prompt,
                               resolution=resolution, autocast=autocast, text=text)
            for index, image in zip(block, images):
                if index in wanted:
                    _save(image, folder, job.prompt, index)
            made[str(folder)] += len(wanted)
            done += len(wanted)
            if progress:
                progress(done, total, f"Class images for '{job.prompt}': {done}/{total}")
    return made


# --- for a host's own generator (the WebUI's txt2img): the same names, counting and writing as above


def missing_class_images(job: ClassJob) -> List[int]:
    """The indices of `job`'s class images still to make (the lowest free ones, as ensure_class_images picks)."""
    return _missing_indices(Path(job.folder), job)


def prepare_class_folder(folder) -> None:
    _prepare_folder(Path(folder))


def save_class_image(image, folder, prompt: str, index: int) -> Path:
    """Write one class image (PNG) and its caption under the name ensure_class_images gives it."""
    return _save(image, Path(folder), prompt, index)

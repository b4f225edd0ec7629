"""Class images made by the WebUI's own txt2img (its sampler, VAE and settings) with the run's base checkpoint.

Called by the adapter inside the WebUI's queue lock, before the training moves the WebUI's model away. Each
image is one `process_images` call on a `StableDiffusionProcessingTxt2Img` (A1111 v1.10.1
modules/processing.py), seeded per image as the built-in generator seeds it and saved under the same
name (class_<index>-<prompt hash>.png with its caption), so counting, reuse and a later run that asks
for more behave as with the built-in generator. On A1111 the base is named through `override_settings`: the
WebUI loads it for the call and puts the previously loaded checkpoint back afterwards (processing.py
process_images, override_settings_restore_afterwards). Forge's process_images restores the option but
reloads nothing, and loads what modules_forge/main_entry.py checkpoint_change() selected: there the base is
selected before the images and the previous checkpoint selected again after them.
"""

import importlib
import inspect
from contextlib import closing, contextmanager
from pathlib import Path

from dreambooth_ext.errors import UserError

# A1111 v1.10.1's txt2img default: sampler 'DPM++ 2M' with the 'Automatic' scheduler (a field since v1.9);
# before the split the same sampler was named with its schedule.
SAMPLER, SCHEDULER, SAMPLER_BEFORE_SCHEDULERS = "DPM++ 2M", "Automatic", "DPM++ 2M Karras"
SEED_LIMIT = 2**32  # the WebUI's seeds are 32-bit (its seed box and infotext)


def make_class_images(host, cfg, job) -> int:
    """Write the class images each concept's folder lacks; how many were written. Stops at Interrupt (the
    run then stops too) and at Skip (the training goes on with the images made so far)."""
    from dreambooth_ext.train.class_images import class_jobs_from_config, merge_jobs, missing_class_images

    plan = [(cj, missing_class_images(cj)) for cj in merge_jobs(class_jobs_from_config(cfg))]
    plan = [(cj, missing) for cj, missing in plan if missing]
    total = sum(len(missing) for _, missing in plan)
    if not total:
        return 0
    title = _title_of(host, cfg.checkpoint)
    with _base_selected(host, title) as base:
        return _make(host, cfg, job, plan, total, base)


def _make(host, cfg, job, plan, total: int, base: dict) -> int:
    from dreambooth_ext.train.class_images import image_seed, prepare_class_folder, save_class_image

    processing, shared = importlib.import_module("modules.processing"), importlib.import_module("modules.shared")
    state = shared.state
    state.begin(f"dreambooth: class images for {cfg.name}")  # the WebUI's bar, Interrupt and Skip for this stage
    done = 0
    try:
        job.stage("class images (WebUI txt2img)", 0, total)
        for cj, missing in plan:
            prepare_class_folder(cj.folder)
            for index in missing:
                if _stopped(host, job):
                    return done
                state.job_count, state.job_no = total, done  # process_images' nextjob() counts one on
                p = processing.StableDiffusionProcessingTxt2Img(**_arguments(
                    processing.StableDiffusionProcessingTxt2Img, cfg, cj.prompt,
                    image_seed(cfg.seed, cj.prompt, index) % SEED_LIMIT, base))
                with closing(p):  # as the WebUI's txt2img does (modules/txt2img.py, modules/api/api.py)
                    images = processing.process_images(p).images
                if _stopped(host, job) or not images:  # a stopped sampling returns its half-made image
                    return done
                save_class_image(images[0], cj.folder, cj.prompt, index)
                done += 1
                job.stage("class images (WebUI txt2img)", done, total)
        return done
    finally:
        if host.skipped():
            host.clear_skip()
            job.stage(f"Skip pressed: training with the {done} class images the WebUI made now and those "
                      "there were")
        state.end()
        # the WebUI's txt2img closes its console "Total progress" bar after a generation; left open, the
        # next txt2img would count on from the class images' steps (seen in Forge)
        shared.total_tqdm.clear()


@contextmanager
def _base_selected(host, title: str):
    """The base checkpoint for the class images: the arguments that name it (A1111), or selected by hand around
    them (Forge)."""
    from dreambooth_ext.host.webui import FORGE

    if host.flavour != FORGE:
        yield {"override_settings": {"sd_model_checkpoint": title}, "override_settings_restore_afterwards": True}
        return
    main_entry = importlib.import_module("modules_forge.main_entry")
    previous = importlib.import_module("modules.shared").opts.data.get("sd_model_checkpoint")
    main_entry.checkpoint_change(title, save=False)  # not written to its settings file: a switch for this stage
    try:
        yield {}
    finally:
        if previous and previous != title:
            main_entry.checkpoint_change(previous, save=False)


def _arguments(cls, cfg, prompt: str, seed: int, base: dict) -> dict:
    """The txt2img settings of one class image: the run's class image settings, one image, nothing saved by the
    WebUI itself (the extension writes the file), and the base checkpoint for this call only."""
    args = dict(prompt=prompt, negative_prompt=cfg.class_image_negative_prompt, seed=seed, steps=cfg.class_image_steps,
                cfg_scale=cfg.class_image_guidance, width=cfg.resolution, height=cfg.resolution, batch_size=1,
                n_iter=1, do_not_save_samples=True, do_not_save_grid=True, **base)
    if "scheduler" in inspect.signature(cls).parameters:
        args.update(sampler_name=SAMPLER, scheduler=SCHEDULER)
    else:
        args.update(sampler_name=SAMPLER_BEFORE_SCHEDULERS)
    return args


def _stopped(host, job) -> bool:
    """Interrupt stops the whole run (the trainer then stops before its first step); Skip only this stage."""
    if host.interrupted():
        job.cancel()
    return job.should_stop() or host.skipped()


def _title_of(host, checkpoint: str) -> str:
    info = host._info_for(checkpoint)
    if info is None:
        raise UserError(f"The WebUI does not list the base {Path(checkpoint).name} as a checkpoint; pick the base "
                        "from its checkpoint list or set 'class_image_generator' to 'builtin'.")
    return info.title

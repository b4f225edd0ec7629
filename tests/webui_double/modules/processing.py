"""modules/processing.py (A1111 v1.10.1): the txt2img processing object and process_images, as far as the
extension drives them. The constructor takes the dataclass fields of StableDiffusionProcessing and
StableDiffusionProcessingTxt2Img (an unknown keyword is a TypeError, as with the dataclass); process_images
follows the WebUI's handling of override_settings (the checkpoint named there is loaded for the call and
the previous one reloaded afterwards) and of the shared state (job count, Skip cleared before an image,
Interrupt stops the loop, a sampling cut short still returns its image)."""

import hashlib
from dataclasses import dataclass, field

from PIL import Image

from modules import call_queue, sd_models, shared

calls = []  # double only: one record per process_images call, for tests
during_sampling = None  # double only: called while an image samples (a test presses Skip or Interrupt there)


@dataclass(repr=False)
class StableDiffusionProcessing:  # processing.py: StableDiffusionProcessing (init fields)
    sd_model: object = None  # processing.py: a property returning shared.sd_model; setting it does nothing
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    prompt_for_display: str = None
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    overlay_images: list = None
    eta: float = None
    do_not_reload_embeddings: bool = False
    denoising_strength: float = None
    ddim_discretize: str = None
    s_min_uncond: float = None
    s_churn: float = None
    s_tmax: float = None
    s_tmin: float = None
    s_noise: float = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    sampler_index: int = None
    refiner_checkpoint: str = None
    refiner_switch_at: float = None
    token_merging_ratio: float = 0
    token_merging_ratio_hr: float = 0
    disable_extra_networks: bool = False
    firstpass_image: object = None
    scripts_value: object = field(default=None, init=False)

    def __post_init__(self):
        self.override_settings = self.override_settings or {}
        self.extra_generation_params = self.extra_generation_params or {}

    @property
    def scripts(self):
        return self.scripts_value

    def close(self):  # processing.py: StableDiffusionProcessing.close() drops the sampler and conditionings
        self.closed = True  # double only


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):  # processing.py: its own init fields
    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str = None
    hr_sampler_name: str = None
    hr_scheduler: str = None
    hr_prompt: str = ''
    hr_negative_prompt: str = ''
    force_task_id: str = None


class Processed:  # processing.py: Processed (images and what the extension reads)
    def __init__(self, p, images_list, seed=-1):
        self.images, self.seed, self.prompt = images_list, seed, p.prompt


def _image(p, checkpoint):
    """Stands for the sampled picture: a colour that depends on prompt, seed, settings and the loaded model."""
    key = f"{p.prompt}|{p.negative_prompt}|{p.seed}|{p.steps}|{p.cfg_scale}|{checkpoint}".encode()
    r, g, b = hashlib.sha256(key).digest()[:3]
    return Image.new("RGB", (p.width, p.height), (r, g, b))


def process_images(p):
    """processing.py: process_images(): override_settings applied (sd_model_checkpoint through
    reload_model_weights), process_images_inner, then the old settings and checkpoint restored."""
    opts = shared.opts
    stored_opts = {k: opts.data[k] for k in p.override_settings if k in opts.data}
    try:
        if sd_models.checkpoint_aliases.get(p.override_settings.get('sd_model_checkpoint')) is None:
            p.override_settings.pop('sd_model_checkpoint', None)
            sd_models.reload_model_weights()
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
            if k == 'sd_model_checkpoint':
                sd_models.reload_model_weights()
        return _inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)
                if k == 'sd_model_checkpoint':
                    sd_models.reload_model_weights()


def _inner(p):
    """processing.py: process_images_inner(): per iteration Skip is cleared and Interrupt ends the loop; the
    sampler stops early on either (sd_samplers_common.InterruptedException) and its image is still returned."""
    state = shared.state
    if state.job_count == -1:
        state.job_count = p.n_iter
    model = sd_models.model_data.sd_model
    checkpoint = getattr(model, "sd_model_checkpoint", None)
    images = []
    for n in range(p.n_iter):
        if state.skipped:
            state.skipped = False
        if state.interrupted or state.stopping_generation:
            break
        state.sampling_steps, state.sampling_step = p.steps, 0
        if during_sampling is not None:
            during_sampling(p)
        state.sampling_step = p.steps
        for _ in range(p.steps):  # sd_samplers_common.py: update_step() counts each step on the console bar
            shared.total_tqdm.update()
        calls.append({"kwargs": {k: getattr(p, k) for k in p.__dataclass_fields__ if k != "scripts_value"},
                      "checkpoint": checkpoint, "locked": call_queue.queue_lock.locked(),
                      "interrupted": state.interrupted, "skipped": state.skipped, "p": p})
        images += [_image(p, checkpoint) for _ in range(p.batch_size)]
        state.nextjob()
    return Processed(p, images, p.seed)

"""A training run from config to files in the WebUI's folders, readable top to bottom.

prepare -> class images -> examples and caches -> what trains -> optimizer -> (resume) ->
steps with samples, state and model saves -> final save.
"""

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from dreambooth_ext.errors import UserError
from dreambooth_ext.train import state as st
from dreambooth_ext.train.batches import MicroBatch, PromptCache
from dreambooth_ext.train.config import TrainConfig, to_dict
from dreambooth_ext.train.config_checks import validate
from dreambooth_ext.train.dataset import LatentSource, build_examples
from dreambooth_ext.train.reporter import Cancelled, Reporter


@dataclass
class TrainResult:
    status: str  # finished | cancelled
    step: int
    outputs: List[str] = field(default_factory=list)
    losses: List[List[float]] = field(default_factory=list)
    samples: List[str] = field(default_factory=list)
    best_step: Optional[int] = None  # the monitor's pick (see train/monitor.py); None when it did not run


def _resumable_config(cfg: TrainConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in st.RESUMABLE_CHANGES}


def train(cfg: TrainConfig, reporter: Optional[Reporter] = None) -> TrainResult:
    """Train per `cfg`; UserError for bad input before any work, and nothing half-written in the models folder."""
    from accelerate import Accelerator

    from dreambooth_ext.train.optim import optimizer_available
    from dreambooth_ext.train.precision import check_attention, choose_attention, pick_device, resolve_mixed_precision

    reporter = reporter or Reporter()
    for w in validate(cfg):
        reporter.warn(w)
    device = pick_device()
    check_attention(cfg.attention, device)
    usable, why = optimizer_available(cfg.optimizer, device)
    if not usable:
        raise UserError(f"Setting 'optimizer' is {cfg.optimizer}, which cannot run here ({why}); choose adamw or adafactor.")
    mode, notes = resolve_mixed_precision(cfg.mixed_precision, device)
    for n in notes:
        reporter.warn(n)
    acc = Accelerator(mixed_precision=mode, cpu=device.type == "cpu")
    device = acc.device
    if not acc.is_main_process:
        reporter = _Quiet(reporter)  # one progress bar and one set of messages under `accelerate launch`
    workspace = cfg.workspace_path()
    workspace.mkdir(parents=True, exist_ok=True)

    bundle = _load_base(cfg, workspace, acc, reporter)
    _check_sizes(cfg, bundle)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode, torch.float32)
    try:
        _class_images(cfg, bundle, acc, reporter, device)
    except Cancelled:
        reporter.stage("stopped while generating class images; the ones made are kept")
        return TrainResult("cancelled", 0)
    instances, classes = build_examples(cfg, reporter.warn)
    if cfg.prior_loss_weight > 0 and any(c.class_prompt for c in cfg.concepts) and not len(classes):
        reporter.warn("no class images are available, so prior preservation is off for this run")

    latents = LatentSource(bundle.vae, cfg, cfg.cache_latents)
    if cfg.cache_latents:
        every = instances.examples + classes.examples
        latents.precompute(every, lambda d, t: reporter.stage("caching latents", d, t))

    from dreambooth_ext.train.trainables import setup_trainables

    trainables = setup_trainables(cfg, bundle, reporter.warn)
    attention = choose_attention(cfg.attention, device, bundle.unet)
    if cfg.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        if trainables.te_mode == "full":
            for te in bundle.text_encoders:
                te.gradient_checkpointing_enable()
    _place(bundle, trainables, device, mode)
    prompts = PromptCache(bundle, bundle.text_encoders, cfg.cache_text_embeddings and not trainables.te_trained)
    if prompts.enabled:
        prompts.precompute([ex.prompt for s in (instances, classes) for ex in s.examples])

    monitor = _monitor(cfg, bundle, trainables, workspace, reporter) if acc.is_main_process else None
    optimizer, lr_scheduler, ema = _optimizer(cfg, trainables, device)
    unet = acc.prepare(bundle.unet)  # data-parallel under `accelerate launch`; the same module otherwise
    optimizer = acc.prepare(optimizer)
    micro = MicroBatch(cfg, bundle, unet, latents, prompts, device, weight_dtype)

    progress = _resume(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, reporter)
    result = TrainResult("finished", progress.step, losses=progress.losses)
    procs = f", {acc.num_processes} processes" if acc.num_processes > 1 else ""
    precision = "fp32" if mode == "no" else f"{mode} mixed precision"
    reporter.stage(f"training on {device.type} ({precision}, {attention} attention{procs})")
    reporter.start(progress.step, cfg.max_steps, list(progress.losses))
    started, first = time.time(), progress.step
    while progress.step < cfg.max_steps:
        loss = _optimizer_step(cfg, progress.step, micro, instances, classes, trainables, optimizer, acc)
        lr_scheduler.step()
        if ema is not None:
            ema.update(trainables.parameters(), progress.step)
        progress.step += 1
        progress.losses.append([progress.step, loss])
        reporter.progress(progress.step, cfg.max_steps, loss, lr_scheduler.get_last_lr()[0])
        step = progress.step
        if not acc.is_main_process:
            continue
        if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.max_steps:
            result.samples += _samples(cfg, bundle, trainables, workspace, step, ema, reporter)
            _measure(monitor, trainables, step, ema, reporter)
        if cfg.save_state_every and step % cfg.save_state_every == 0 and step < cfg.max_steps:
            _save_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress)
        if cfg.save_model_every and step % cfg.save_model_every == 0 and step < cfg.max_steps:
            result.outputs += [str(p) for p in _outputs(cfg, bundle, trainables, step, ema, reporter)]
        if reporter.should_stop() and step < cfg.max_steps:
            _save_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress)
            reporter.stage(f"stopped at step {step}; the state is saved, run again to resume")
            result.status, result.step = "cancelled", step
            return result
    acc.wait_for_everyone()
    result.step = progress.step
    if acc.is_main_process:
        if progress.step > first:
            _save_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress)
            reporter.stage(f"trained {progress.step - first} steps in {time.time() - started:.1f} s")
        if cfg.sample_every:
            result.samples += _samples(cfg, bundle, trainables, workspace, progress.step, ema, reporter)
            result.best_step = _measure(monitor, trainables, progress.step, ema, reporter, last=True)
        result.outputs += [str(p) for p in _outputs(cfg, bundle, trainables, progress.step, ema, reporter)]
    return result


def _check_sizes(cfg, bundle):
    """Image sides must survive the VAE's and the UNet's downsampling without a remainder."""
    vae_factor = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    multiple = vae_factor * 2 ** (len(bundle.unet.config.down_block_types) - 1)
    if cfg.resolution % multiple:
        raise UserError(f"Setting 'resolution' is {cfg.resolution}; this model needs a multiple of {multiple} "
                        f"(e.g. {cfg.resolution // multiple * multiple or multiple}).")
    if cfg.bucketing and cfg.bucket_step % multiple:
        raise UserError(f"Setting 'bucket_step' is {cfg.bucket_step}; this model needs a multiple of {multiple}.")


class _Quiet(Reporter):
    """What the other processes of a data-parallel run report: nothing, but they still honour a stop."""

    def __init__(self, inner: Reporter):
        self._inner = inner

    def stage(self, text, done=None, total=None):
        pass

    def warn(self, text):
        pass

    def should_stop(self):
        return self._inner.should_stop()


def _load_base(cfg, workspace: Path, acc, reporter):
    from dreambooth_ext.train.models import load_bundle, prepare_base

    with _main_first(acc):
        folder = prepare_base(cfg.checkpoint, workspace, cfg.family, progress=reporter.stage)
    reporter.stage(f"loading {folder}")
    return load_bundle(folder)


@contextlib.contextmanager
def _main_first(acc):
    """The main process does shared work (conversion, class images) while the others wait."""
    if not acc.is_main_process:
        acc.wait_for_everyone()
    yield
    if acc.is_main_process:
        acc.wait_for_everyone()


def _class_images(cfg, bundle, acc, reporter, device):
    from dreambooth_ext.train.class_images import class_jobs_from_config, ensure_class_images

    jobs = class_jobs_from_config(cfg)
    if not jobs:
        return
    with _main_first(acc):
        if acc.is_main_process:
            for m in [bundle.unet, bundle.vae] + bundle.text_encoders:
                m.to(device)
            made = ensure_class_images(
                bundle, jobs, steps=cfg.class_image_steps, guidance=cfg.class_image_guidance,
                batch_size=cfg.class_image_batch_size, negative_prompt=cfg.class_image_negative_prompt,
                resolution=cfg.resolution, seed=cfg.seed,
                progress=lambda d, t, msg: reporter.stage("class images", d, t), should_stop=reporter.should_stop)
            if sum(made.values()):
                reporter.stage(f"generated {sum(made.values())} class images")
            if reporter.should_stop():
                raise Cancelled()


def _place(bundle, trainables, device, mode):
    """Trained weights stay fp32 (master copies); frozen modules run in the mixed-precision dtype."""
    from dreambooth_ext.train.lora import cast_lora_parameters
    from dreambooth_ext.train.precision import trainable_dtype

    bundle.vae.to(device, trainable_dtype(mode, device, module="vae"))
    bundle.unet.to(device, trainable_dtype(mode, device, trained=not trainables.unet_lora))
    if trainables.unet_lora:
        cast_lora_parameters(bundle.unet, torch.float32)
    for te in bundle.text_encoders:
        te.to(device, trainable_dtype(mode, device, trained=trainables.te_mode == "full"))
        if trainables.te_mode == "lora":
            cast_lora_parameters(te, torch.float32)


def _optimizer(cfg, trainables, device):
    from dreambooth_ext.train.ema import EMA
    from dreambooth_ext.train.optim import make_lr_scheduler, make_optimizer

    optimizer = make_optimizer(cfg.optimizer, trainables.groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                               eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, device=device)
    lr_scheduler = make_lr_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.lr_warmup_steps,
                                     total_steps=cfg.max_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    ema = EMA(trainables.parameters(), cfg.ema_decay) if cfg.use_ema else None
    return optimizer, lr_scheduler, ema


def _optimizer_step(cfg, step, micro, instances, classes, trainables, optimizer, acc) -> float:
    """Accumulated micro-batches, clipping and one optimizer step; returns the mean loss."""
    te_grad = trainables.te_trained and not (cfg.text_encoder_stop_step and step >= cfg.text_encoder_stop_step)
    total = 0.0
    for a in range(cfg.gradient_accumulation_steps):
        index = (step * cfg.gradient_accumulation_steps + a) * acc.num_processes + acc.process_index
        sync = a == cfg.gradient_accumulation_steps - 1
        with (contextlib.nullcontext() if sync else acc.no_sync(micro.unet)), acc.autocast():
            loss = micro.loss(instances, index, "instance", te_grad)
            if len(classes):
                loss = loss + cfg.prior_loss_weight * micro.loss(classes, index, "class", te_grad)
        acc.backward(loss / cfg.gradient_accumulation_steps)
        total += loss.detach().float().item()
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(trainables.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean = torch.tensor(total / cfg.gradient_accumulation_steps, device=acc.device)
    return acc.reduce(mean, reduction="mean").item() if acc.num_processes > 1 else mean.item()


@contextlib.contextmanager
def _ema_weights(trainables, ema):
    """Swap the EMA weights in while saving or sampling, then put the trained ones back."""
    if ema is None:
        yield
        return
    params = trainables.parameters()
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def _samples(cfg, bundle, trainables, workspace, step, ema, reporter) -> List[str]:
    from dreambooth_ext.train.samples import generate_samples, sample_prompts, sample_seeds

    reporter.stage(f"samples at step {step}")
    with _ema_weights(trainables, ema):
        paths = generate_samples(
            bundle, trainables.unet, trainables.text_encoders, sample_prompts(cfg),
            sample_seeds(cfg, cfg.num_sample_images), steps=cfg.sample_steps, guidance=cfg.sample_guidance,
            negative_prompt=cfg.sample_negative_prompt, resolution=cfg.resolution, out_dir=workspace / "samples",
            step=step, on_image=lambda path, prompt, seed: reporter.sample(str(path), prompt, seed, step))
    return [str(p) for p in paths]


def _monitor(cfg, bundle, trainables, workspace, reporter):
    """The fidelity / class-drift monitor, while samples are on (it measures at the sample steps)."""
    from dreambooth_ext.train.monitor import Monitor

    if not cfg.sample_every or not cfg.concepts:
        return None
    reporter.stage("monitor: the base model's pictures for the instance and class prompts")
    return Monitor(cfg, bundle, trainables.unet, trainables.text_encoders, workspace)


def _measure(monitor, trainables, step, ema, reporter, last=False):
    from dreambooth_ext.train.monitor import closing_note, describe

    if monitor is None:
        return None
    with _ema_weights(trainables, ema):
        reporter.stage(describe(monitor.measure(step)))
    if last:
        reporter.stage(closing_note(monitor.record))
    return monitor.record.best_step()


def _outputs(cfg, bundle, trainables, step, ema, reporter):
    from dreambooth_ext.train.output import write_outputs

    reporter.stage(f"saving the model at step {step}")
    with _ema_weights(trainables, ema):
        return write_outputs(cfg, bundle, trainables, step, reporter)


def _save_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress):
    progress.config = _resumable_config(cfg)
    st.save_state(workspace, trainables.state(), optimizer, lr_scheduler, acc.scaler, ema, progress)


def _resume(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, reporter) -> st.Progress:
    saved = st.read_progress(workspace)
    if saved is None or saved.step == 0:
        return st.Progress(config=_resumable_config(cfg))
    changed = st.check_resumable(saved.config, _resumable_config(cfg))
    if changed:
        raise UserError(f"A saved run of '{cfg.name}' at step {saved.step} used other settings ({', '.join(changed[:4])}); "
                        f"give the new run another name, or delete {st.state_dir(workspace)} to start afresh.")
    trained, rest = st.load_state(workspace)
    trainables.load(trained)
    optimizer.load_state_dict(rest["optimizer"])
    lr_scheduler.load_state_dict(rest["lr_scheduler"])
    if acc.scaler is not None and rest.get("scaler"):
        acc.scaler.load_state_dict(rest["scaler"])
    if ema is not None and rest.get("ema"):
        ema.load_state_dict(rest["ema"])
    reporter.stage(f"resuming '{cfg.name}' from step {saved.step}")
    return saved

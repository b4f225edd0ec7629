"""A training run from config to files in the WebUI's folders, readable top to bottom.

prepare -> class images -> examples and caches -> what trains -> optimizer -> (resume) ->
steps with samples, state and model saves -> final save.
"""

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from dreambooth_ext.errors import UserError
from dreambooth_ext.train import state as st
from dreambooth_ext.train.batches import MicroBatch, PromptCache
from dreambooth_ext.train.conditioning import TextOptions
from dreambooth_ext.train.config import TrainConfig
from dreambooth_ext.train.dataset import LatentSource, build_examples
from dreambooth_ext.train.finite import NonFiniteWeights, check_finite_base, check_finite_weights, non_finite_message
from dreambooth_ext.train.prompt_length import long_prompt_warning
from dreambooth_ext.train.reporter import Cancelled, Reporter


ENCODE_AT_FIRST_USE_ON_CPU = True  # False: cache every latent the run shows before its first step, as on a GPU


@dataclass
class TrainResult:
    status: str  # finished | cancelled
    step: int
    outputs: List[str] = field(default_factory=list)
    losses: List[List[float]] = field(default_factory=list)
    samples: List[str] = field(default_factory=list)
    best_step: Optional[int] = None  # the monitor's pick (see train/monitor.py); None when it did not run


def train(cfg: TrainConfig, reporter: Optional[Reporter] = None) -> TrainResult:
    """Train per `cfg`; UserError for bad input before any work, and nothing half-written in the models folder.

    The run holds its workspace (a lock file) from the checks to the end; a stop asked for
    before the training steps (converting, scanning, class images, caching) ends it as cancelled.
    """
    from dreambooth_ext.train.precheck import precheck
    from dreambooth_ext.train.workspace import hold_workspace

    reporter = reporter or Reporter()
    if cfg.max_epochs > 0:
        from dreambooth_ext.train.epochs import resolve_max_steps

        cfg = resolve_max_steps(cfg)
        reporter.stage(f"{cfg.max_epochs} epochs = {cfg.max_steps} steps")
    for w in precheck(cfg):
        reporter.warn(w)
    if cfg.class_image_generator == "webui" and not getattr(reporter, "host_made_class_images", False):
        from dreambooth_ext.jobs import NOT_IN_WEBUI  # the CLI, or a caller without the WebUI's job hooks

        raise UserError(NOT_IN_WEBUI)
    with hold_workspace(cfg, reporter):
        try:
            return _train(cfg, reporter)
        except Cancelled:
            reporter.stage("stopped before training began; what was made is kept, run again to go on")
            return TrainResult("cancelled", 0)


def _train(cfg: TrainConfig, reporter: Reporter) -> TrainResult:
    from accelerate import Accelerator

    from dreambooth_ext.train.optim import optimizer_available
    from dreambooth_ext.train.placement import decide_placement, forget_last_accelerator
    from dreambooth_ext.train.precision import check_attention, choose_attention, pick_device

    device = pick_device()
    check_attention(cfg.attention, device)
    usable, why = optimizer_available(cfg.optimizer, device)
    if not usable:
        raise UserError(f"Setting 'optimizer' is {cfg.optimizer}, which cannot run here ({why}); choose adamw or adafactor.")
    placement, notes = decide_placement(cfg, device)
    for n in notes:
        reporter.warn(n)
    mode = placement.mode
    forget_last_accelerator()
    acc = Accelerator(mixed_precision=mode, cpu=device.type == "cpu", kwargs_handlers=_ddp_kwargs(cfg))
    device = acc.device
    placement = placement.on(device)  # cuda:N under `accelerate launch`
    if not acc.is_main_process:
        reporter = _Quiet(reporter)  # one progress bar and one set of messages under `accelerate launch`
    workspace = cfg.workspace_path()
    workspace.mkdir(parents=True, exist_ok=True)

    bundle = _load_base(cfg, workspace, acc, reporter, placement)
    _check_sizes(cfg, bundle)
    if cfg.clip_skip > 1 and bundle.family != "sd1":
        reporter.warn(f"Setting 'clip_skip' is {cfg.clip_skip}, but {bundle.family} models read their own fixed "
                      "layer of the text encoder (as in the WebUI), so it is ignored.")
    placement.enter(bundle, "prepare")  # class images and latent caching run on the training device
    try:
        _class_images(cfg, bundle, acc, reporter, placement)
    except Cancelled:
        reporter.stage("stopped while generating class images; the ones made are kept")
        return TrainResult("cancelled", 0)
    instances, classes = build_examples(cfg, reporter.warn, should_stop=reporter.should_stop)
    for w in long_prompt_warning(bundle.tokenizers[0], instances.examples + classes.examples, cfg.sample_prompts,
                                 cfg.max_prompt_tokens):
        reporter.warn(w)
    if cfg.prior_loss_weight > 0 and any(c.class_prompt for c in cfg.concepts) and not len(classes):
        reporter.warn("no class images are available, so prior preservation is off for this run")

    latents = _cache_latents(cfg, bundle, workspace, instances, classes, acc, reporter)

    from dreambooth_ext.train.trainables import setup_trainables

    trainables = setup_trainables(cfg, bundle, reporter.warn)
    attention = choose_attention(cfg.attention, device, bundle.unet)
    if cfg.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        if trainables.te_mode == "full":
            for te in bundle.text_encoders:
                te.gradient_checkpointing_enable()
    _place(bundle, trainables, placement)
    # data-parallel under `accelerate launch` (the same modules otherwise): the UNet and a trained text encoder
    unet = acc.prepare(bundle.unet)
    text_encoders = [acc.prepare(te) for te in bundle.text_encoders] if trainables.te_trained else bundle.text_encoders
    prompts = PromptCache(bundle, text_encoders, cfg.cache_text_embeddings and not trainables.te_trained,
                          TextOptions.from_config(cfg, bundle.family))
    if prompts.enabled:
        with placement.autocast():
            prompts.precompute([ex.prompt for s in (instances, classes) for ex in s.examples])
    placement.enter(bundle, "train")

    monitor = _monitor(cfg, bundle, trainables, workspace, reporter, placement) if acc.is_main_process else None
    optimizer, lr_scheduler, ema = _optimizer(cfg, trainables, device)
    optimizer = acc.prepare(optimizer)
    micro = MicroBatch(cfg, bundle, unet, latents, prompts, device, placement.compute_dtype)
    synced = [unet] + (text_encoders if trainables.te_trained else [])

    progress = _resume(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, reporter)
    result = TrainResult("finished", progress.step, losses=progress.losses)
    procs = f", {acc.num_processes} processes" if acc.num_processes > 1 else ""
    precision = "fp32" if mode == "no" else f"{mode} mixed precision"
    reporter.stage(f"training on {device.type} ({precision}, {attention} attention{procs}; {placement.describe()})")
    reporter.start(progress.step, cfg.max_steps, list(progress.losses))
    started, first = time.time(), progress.step
    while progress.step < cfg.max_steps:
        loss = _optimizer_step(cfg, progress.step, micro, instances, classes, trainables, optimizer, acc, synced)
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
            result.samples += _samples_or_warn(cfg, bundle, trainables, workspace, step, ema, reporter, placement)
            _measure(monitor, trainables, step, ema, reporter, placement)
        if cfg.save_state_every and step % cfg.save_state_every == 0 and step < cfg.max_steps:
            _save_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress)
        if cfg.save_model_every and step % cfg.save_model_every == 0 and step < cfg.max_steps:
            result.outputs += [str(p) for p in _outputs_or_state(cfg, bundle, trainables, workspace, optimizer,
                                                                 lr_scheduler, acc, ema, progress, reporter)]
        if reporter.should_stop() and step < cfg.max_steps:
            _save_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress)
            if cfg.save_model_on_interrupt:
                result.outputs += _model_on_interrupt(cfg, bundle, trainables, step, ema, reporter)
            reporter.stage(f"stopped at step {step}; the state is saved, run again to resume")
            result.status, result.step = "cancelled", step
            return result
    acc.wait_for_everyone()
    result.step = progress.step
    if acc.is_main_process:
        state_error = None
        trained = progress.step > first
        if trained:
            reporter.stage(f"trained {progress.step - first} steps in {time.time() - started:.1f} s")
        # the state (about 3x the model) is written at the end only when the settings keep states;
        # otherwise only if the model cannot be written, so the training is never lost
        keep_state = trained and cfg.save_state_every > 0
        if keep_state:
            state_error = _final_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress)
        if cfg.sample_every:
            result.samples += _samples_or_warn(cfg, bundle, trainables, workspace, progress.step, ema, reporter,
                                               placement)
            result.best_step = _measure(monitor, trainables, progress.step, ema, reporter, placement, last=True)
        rescue = None
        if trained and not keep_state:
            def rescue():
                return _final_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress)
        outputs = _final_outputs(cfg, bundle, trainables, workspace, progress.step, ema, reporter, state_error,
                                 rescue)
        result.outputs += [str(p) for p in outputs]
        result.outputs = [p for p in result.outputs if Path(p).exists()]  # keep_last_models removed the rest
    return result


def _stage_or_stop(reporter, text, done, total):
    reporter.stage(text, done, total)
    if reporter.should_stop():
        raise Cancelled()


def _cache_latents(cfg, bundle, workspace, instances, classes, acc, reporter) -> LatentSource:
    """The latents the run will use, from the workspace's cache or encoded in batches; only views it shows."""
    from dreambooth_ext.train.latent_cache import DiskCache, used_views

    if not cfg.cache_latents:
        return LatentSource(bundle.vae, cfg, False)
    latents = LatentSource(bundle.vae, cfg, True, DiskCache(workspace / "latents", bundle.vae, reporter.warn))
    if acc.device.type == "cpu" and ENCODE_AT_FIRST_USE_ON_CPU:
        # the VAE stays where the steps run: each view is encoded (or read back) at its first use, so
        # the first step comes as early as it can and the total is the same
        return latents
    total = cfg.max_steps * cfg.gradient_accumulation_steps * acc.num_processes
    views = used_views(instances, total, cfg) + used_views(classes, total, cfg)
    latents.precompute(views, lambda d, t: _stage_or_stop(reporter, "caching latents", d, t))
    return latents


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


def _ddp_kwargs(cfg):
    from accelerate import DistributedDataParallelKwargs

    # SDXL's first text encoder feeds its penultimate layer only: its last layer gets no gradient
    return [DistributedDataParallelKwargs(find_unused_parameters=cfg.text_encoder_mode != "frozen")]


def _load_base(cfg, workspace: Path, acc, reporter, placement):
    from dreambooth_ext.train.models import load_bundle, prepare_base

    with _main_first(acc):
        folder = prepare_base(cfg.checkpoint, workspace, cfg.family, progress=reporter.stage,
                              should_stop=reporter.should_stop)
    reporter.stage(f"loading {folder}")
    bundle = load_bundle(folder, dtypes=placement.load_dtypes())
    if Path(folder) == Path(cfg.checkpoint).expanduser():  # a diffusers folder: no conversion checked it
        check_finite_base(bundle, folder)
    return bundle


@contextlib.contextmanager
def _main_first(acc):
    """The main process does shared work (conversion, class images) while the others wait."""
    if not acc.is_main_process:
        acc.wait_for_everyone()
    yield
    if acc.is_main_process:
        acc.wait_for_everyone()


def _class_images(cfg, bundle, acc, reporter, placement):
    from dreambooth_ext.train.class_images import class_jobs_from_config, ensure_class_images

    jobs = class_jobs_from_config(cfg)
    if not jobs or cfg.class_image_generator == "webui":  # the WebUI's txt2img made them before the run
        return
    with _main_first(acc):
        if acc.is_main_process:
            made = ensure_class_images(
                bundle, jobs, steps=cfg.class_image_steps, guidance=cfg.class_image_guidance,
                batch_size=cfg.class_image_batch_size, negative_prompt=cfg.class_image_negative_prompt,
                resolution=cfg.resolution, seed=cfg.seed,
                progress=lambda d, t, msg: reporter.stage("class images", d, t), should_stop=reporter.should_stop,
                autocast=placement.autocast, text=TextOptions.from_config(cfg, bundle.family))
            if sum(made.values()):
                reporter.stage(f"generated {sum(made.values())} class images")
            if reporter.should_stop():
                raise Cancelled()


def _place(bundle, trainables, placement):
    """LoRA adapters, new since loading, join their modules on the device as fp32 master weights."""
    from dreambooth_ext.train.lora import cast_lora_parameters

    placement.enter(bundle, "prepare")
    if trainables.unet_lora:
        cast_lora_parameters(bundle.unet, torch.float32)
    if trainables.te_mode == "lora":
        for te in bundle.text_encoders:
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


def _no_sync(acc, modules, sync: bool):
    """Gradients of the data-parallel modules are averaged across processes only at the last micro-batch."""
    stack = contextlib.ExitStack()
    if not sync:
        for m in modules:
            stack.enter_context(acc.no_sync(m))
    return stack


def _optimizer_step(cfg, step, micro, instances, classes, trainables, optimizer, acc, synced) -> float:
    """Accumulated micro-batches, clipping and one optimizer step; returns the mean loss.

    The loss stays on the device until the step is done: one host sync per step, not per micro-batch.
    """
    te_grad = trainables.te_trained and not (cfg.text_encoder_stop_step and step >= cfg.text_encoder_stop_step)
    total = torch.zeros((), device=acc.device)
    for a in range(cfg.gradient_accumulation_steps):
        index = (step * cfg.gradient_accumulation_steps + a) * acc.num_processes + acc.process_index
        sync = a == cfg.gradient_accumulation_steps - 1
        with _no_sync(acc, synced, sync), acc.autocast():
            loss = micro.loss(instances, classes, index, te_grad)  # + prior_loss_weight * the class loss
        acc.backward(loss / cfg.gradient_accumulation_steps)
        total += loss.detach().float()
    total_value = total.item()  # the step's one host sync
    if not math.isfinite(total_value):
        optimizer.zero_grad(set_to_none=True)  # these gradients never reach the weights
        raise UserError(non_finite_message(cfg, step + 1, total_value, str(acc.mixed_precision)))
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(trainables.parameters(), cfg.max_grad_norm)
    optimizer.step()
    # the wrapped optimizer's own zero_grad: accelerate's inspects a signature at every call
    getattr(optimizer, "optimizer", optimizer).zero_grad(set_to_none=True)
    if acc.num_processes > 1:
        return acc.reduce(total / cfg.gradient_accumulation_steps, reduction="mean").item()
    return total_value / cfg.gradient_accumulation_steps


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


def _samples(cfg, bundle, trainables, workspace, step, ema, reporter, placement) -> List[str]:
    from dreambooth_ext.train.samples import generate_samples, sample_prompts, sample_seeds

    reporter.stage(f"samples at step {step}")
    placement.enter(bundle, "sample")
    with _ema_weights(trainables, ema), _back_to(placement, bundle, "train"):
        paths = generate_samples(
            bundle, trainables.unet, trainables.text_encoders, sample_prompts(cfg),
            sample_seeds(cfg, cfg.num_sample_images), steps=cfg.sample_steps, guidance=cfg.sample_guidance,
            negative_prompt=cfg.sample_negative_prompt, resolution=cfg.resolution, out_dir=workspace / "samples",
            step=step, on_image=lambda path, prompt, seed: reporter.sample(str(path), prompt, seed, step),
            autocast=placement.autocast, text=TextOptions.from_config(cfg, bundle.family))
    return [str(p) for p in paths]


@contextlib.contextmanager
def _back_to(placement, bundle, phase):
    try:
        yield
    finally:
        placement.enter(bundle, phase)


def _samples_or_warn(cfg, bundle, trainables, workspace, step, ema, reporter, placement) -> List[str]:
    """Samples that cannot be written (a full disk) are a warning: the training goes on to its model."""
    try:
        return _samples(cfg, bundle, trainables, workspace, step, ema, reporter, placement)
    except UserError as e:
        reporter.warn(str(e))
        return []


def _monitor(cfg, bundle, trainables, workspace, reporter, placement):
    """The fidelity / class-drift monitor, while samples are on (it measures at the sample steps)."""
    from dreambooth_ext.train.monitor import Monitor

    if not cfg.sample_every or not cfg.concepts:
        return None
    reporter.stage("monitor: the base model's pictures for the instance and class prompts")
    placement.enter(bundle, "sample")
    with _back_to(placement, bundle, "train"):
        return Monitor(cfg, bundle, trainables.unet, trainables.text_encoders, workspace, autocast=placement.autocast)


def _measure(monitor, trainables, step, ema, reporter, placement, last=False):
    from dreambooth_ext.train.monitor import closing_note, describe

    if monitor is None:
        return None
    placement.enter(monitor.bundle, "sample")
    with _ema_weights(trainables, ema), _back_to(placement, monitor.bundle, "train"):
        reporter.stage(describe(monitor.measure(step)))
    if last:
        reporter.stage(closing_note(monitor.record))
    return monitor.record.best_step()


def _outputs(cfg, bundle, trainables, step, ema, reporter):
    from dreambooth_ext.train.output import write_outputs

    reporter.stage(f"saving the model at step {step}")
    with _ema_weights(trainables, ema):
        check_finite_weights(cfg, trainables, step)
        written = write_outputs(cfg, bundle, trainables, step, reporter)
    _prune(cfg, reporter)
    return written


def _prune(cfg, reporter):
    from dreambooth_ext.train.retention import prune_saves

    removed = prune_saves(cfg)
    if removed:
        reporter.stage(f"removed {len(removed)} older files of this run (keep_last_models {cfg.keep_last_models})")


def _model_on_interrupt(cfg, bundle, trainables, step, ema, reporter) -> List[str]:
    """save_model_on_interrupt: the model as it is when stopped; a failure is a warning, the state is saved."""
    try:
        return [str(p) for p in _outputs(cfg, bundle, trainables, step, ema, reporter)]
    except NonFiniteWeights:
        raise
    except UserError as e:
        reporter.warn(f"The model at step {step} was not written: {e}")
        return []


def _final_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress) -> Optional[str]:
    """Save the last state; a failure (a full disk) is returned, so the model can still be written."""
    try:
        _save_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress)
    except NonFiniteWeights:
        raise
    except UserError as e:
        return str(e)
    return None


def _outputs_or_state(cfg, bundle, trainables, workspace, optimizer, lr_scheduler, acc, ema, progress, reporter):
    """A model save during the run; when it fails, the state is saved so the training so far is kept."""
    try:
        return _outputs(cfg, bundle, trainables, progress.step, ema, reporter)
    except NonFiniteWeights:
        raise
    except UserError as e:
        state_error = _final_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress)
        if state_error:
            raise UserError(f"{e} The training state could not be saved either: {state_error}") from None
        raise UserError(f"{e} The training state at step {progress.step} is saved in {st.state_dir(workspace)}: "
                        "run the same settings again to go on from there.") from None


def _final_outputs(cfg, bundle, trainables, workspace, step, ema, reporter, state_error, rescue=None):
    """The model files; a failure says what is kept, so nothing trained is lost without a word.

    `rescue` saves the state when the model cannot be written (and was not saved before).
    """
    try:
        written = _outputs(cfg, bundle, trainables, step, ema, reporter)
    except NonFiniteWeights:
        raise
    except UserError as e:
        if rescue is not None:
            state_error = rescue()
        if state_error:
            raise UserError(f"{e} The training state could not be saved either: {state_error}") from None
        raise UserError(f"{e} The training state at step {step} is kept in {st.state_dir(workspace)}: run "
                        "the same settings again to write the model without training again.") from None
    if state_error:
        reporter.warn(f"The model was written, but the training state was not: {state_error}")
    return written


def _save_state(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, progress):
    check_finite_weights(cfg, trainables, progress.step)
    progress.config = st.resumable_config(cfg)
    st.save_state(workspace, trainables.state(), optimizer, lr_scheduler, acc.scaler, ema, progress)


def _resume(cfg, workspace, trainables, optimizer, lr_scheduler, acc, ema, reporter) -> st.Progress:
    saved = st.read_progress(workspace)
    if saved is None or saved.step == 0:
        return st.Progress(config=st.resumable_config(cfg))
    changed = st.check_resumable(saved.config, st.resumable_config(cfg))
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

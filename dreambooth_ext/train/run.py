"""A training run from config to files in the WebUI's folders, in named phases over one TrainingRun:

    prepare  the machine, the accelerator, the base model loaded and placed
    data     class images (from the untouched base), the examples, the latent cache
    place    what trains (full or LoRA), attention, the prompt cache, the optimizer, resume
    loop     the optimizer steps, with samples, monitor, state and model saves on their schedule
    finish   the last state, samples and model files

Class images come before what trains is set up: they are drawn by the base model as it was loaded.
"""

import contextlib
import math
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

from dreambooth_ext.dtypes import describe_precision
from dreambooth_ext.errors import UserError
from dreambooth_ext.train.batches import MicroBatch, PromptCache
from dreambooth_ext.train.checkpointing import checkpoint_text_encoder, release_cast_copies
from dreambooth_ext.train.class_images import NOT_IN_WEBUI, class_jobs_from_config, ensure_class_images
from dreambooth_ext.train.config import TrainConfig
from dreambooth_ext.train.dataset import LatentSource, build_examples
from dreambooth_ext.train.ema import EMA
from dreambooth_ext.train.epochs import resolve_max_steps
from dreambooth_ext.train.finite import non_finite_message
from dreambooth_ext.train.fused_backward import FusedBackward
from dreambooth_ext.train.fused_backward import refusal as fused_refusal
from dreambooth_ext.train.latent_cache import DiskCache, used_views
from dreambooth_ext.train.lora import cast_lora_parameters
from dreambooth_ext.train.models import open_base
from dreambooth_ext.train.optim import make_lr_scheduler, make_optimizer
from dreambooth_ext.train.placement import decide_placement, forget_last_accelerator
from dreambooth_ext.train.precheck import check_sizes, prechecked
from dreambooth_ext.train.precision import choose_attention, pick_device
from dreambooth_ext.train.prompt_length import long_prompt_warning
from dreambooth_ext.train.reporter import Cancelled, Reporter
from dreambooth_ext.train.trainables import setup_trainables
from dreambooth_ext.train.training_run import TrainingRun, TrainResult
from dreambooth_ext.train.workspace import hold_workspace

__all__ = ["train", "TrainResult"]

ENCODE_AT_FIRST_USE_ON_CPU = True  # False: cache every latent the run shows before its first step, as on a GPU


def train(cfg: TrainConfig, reporter: Optional[Reporter] = None) -> TrainResult:
    """Train per `cfg`; UserError for bad input before any work, and nothing half-written in the models folder.

    The run holds its workspace (a lock file) from the checks to the end; a stop asked for
    before the training steps (converting, scanning, class images, caching) ends it as cancelled.
    """
    reporter = reporter or Reporter()
    if cfg.max_epochs > 0:
        cfg = resolve_max_steps(cfg)
        reporter.stage(f"{cfg.max_epochs} epochs = {cfg.max_steps} steps")
    cfg, warnings = prechecked(cfg)  # the normalised copy the whole run reads
    for w in warnings:
        reporter.warn(w)
    if cfg.class_image_generator == "webui" and not getattr(reporter, "host_made_class_images", False):
        raise UserError(NOT_IN_WEBUI)  # the CLI, or a caller without the WebUI's job hooks
    with hold_workspace(cfg, reporter):
        try:
            run = prepare(cfg, reporter)
            data(run)
        except Cancelled as stop:
            reporter.stage(str(stop) or "stopped before training began; what was made is kept, run again to go on")
            return TrainResult("cancelled", 0)
        place(run)
        if not loop(run):
            return run.result
        return finish(run)


def prepare(cfg: TrainConfig, reporter: Reporter) -> TrainingRun:
    """The accelerator, and the base model loaded in the placement's dtypes (precheck checked the device)."""
    placement, notes = decide_placement(cfg, pick_device())
    for n in notes:
        reporter.warn(n)
    forget_last_accelerator()
    acc = Accelerator(mixed_precision=placement.mode, cpu=placement.device.type == "cpu",
                      kwargs_handlers=_ddp_kwargs(cfg))
    if cfg.fused_backward_pass:  # the settings passed the checks; the precision and processes are known now
        why = fused_refusal(accumulation=cfg.gradient_accumulation_steps, mixed_precision=placement.mode,
                            optimizer=cfg.optimizer, processes=acc.num_processes)
        if why:
            raise UserError(why)
    if not acc.is_main_process:
        reporter = _Quiet(reporter)  # one progress bar and one set of messages under `accelerate launch`
    workspace = cfg.workspace_path()
    workspace.mkdir(parents=True, exist_ok=True)
    run = TrainingRun(cfg, reporter, acc, placement.on(acc.device), workspace)  # cuda:N under `accelerate launch`

    # a single file is built in memory in the placement's dtypes, straight onto the device; nothing is written
    run.bundle = open_base(cfg.checkpoint, workspace, cfg.family, dtypes=run.placement.load_dtypes(),
                           devices=run.placement.where("prepare"), progress=reporter.stage,
                           should_stop=reporter.should_stop)
    # precheck read the sizes from the file header where it could; the loaded configs settle it
    check_sizes(cfg, {"vae": dict(run.bundle.vae.config), "unet": dict(run.bundle.unet.config)})
    if cfg.clip_skip > 1 and run.bundle.family != "sd1":
        reporter.warn(f"Setting 'clip_skip' is {cfg.clip_skip}, but {run.bundle.family} models read their own fixed "
                      "layer of the text encoder (as in the WebUI), so it is ignored.")
    run.placement.enter(run.bundle, "prepare")  # class images and latent caching run on the training device
    return run


def data(run: TrainingRun) -> None:
    """Class images, the instance and class examples, and where their latents come from."""
    cfg, reporter = run.cfg, run.reporter
    try:
        _class_images(run)
    except Cancelled:
        raise Cancelled("stopped while generating class images; the ones made are kept") from None
    run.instances, run.classes = build_examples(cfg, reporter.warn, should_stop=reporter.should_stop)
    for w in long_prompt_warning(run.bundle.tokenizers[0], run.instances.examples + run.classes.examples,
                                 cfg.sample_prompts, cfg.max_prompt_tokens, cfg.prompt_weighting):
        reporter.warn(w)
    if cfg.prior_loss_weight > 0 and any(c.class_prompt for c in cfg.concepts) and not len(run.classes):
        reporter.warn("no class images are available, so prior preservation is off for this run")
    run.latents = _latent_source(run)


def place(run: TrainingRun) -> None:
    """What trains, on which device and in which dtype; the prompt cache, the optimizer, and resume."""
    cfg, bundle, acc, placement = run.cfg, run.bundle, run.acc, run.placement
    run.trainables = trainables = setup_trainables(cfg, bundle, run.reporter.warn)
    run.attention = choose_attention(cfg.attention, run.device, bundle.unet)
    if cfg.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        if trainables.te_trained:  # in full or through LoRA adapters
            for te in bundle.text_encoders:
                checkpoint_text_encoder(te)  # non-reentrant: one backward pass, one gradient per tensor
        if placement.mode in ("fp16", "bf16"):  # no half copy of a fully trained model outlives its layer
            for _name, model, is_lora in trainables.trained_modules():
                if not is_lora:
                    release_cast_copies(model)
    # LoRA adapters, new since loading, join their modules on the device as fp32 master weights
    placement.enter(bundle, "prepare")
    if trainables.unet_lora:
        cast_lora_parameters(bundle.unet, torch.float32)
    if trainables.te_mode == "lora":
        for te in bundle.text_encoders:
            cast_lora_parameters(te, torch.float32)
    # data-parallel under `accelerate launch` (the same modules otherwise): the UNet and a trained text encoder
    run.unet = acc.prepare(bundle.unet)
    run.text_encoders = ([acc.prepare(te) for te in bundle.text_encoders] if trainables.te_trained
                         else bundle.text_encoders)
    run.prompts = PromptCache(bundle, run.text_encoders, cfg.cache_text_embeddings and not trainables.te_trained,
                              run.text_options())
    if run.prompts.enabled:
        with placement.autocast():
            run.prompts.precompute([ex.prompt for s in (run.instances, run.classes) for ex in s.examples])
    placement.enter(bundle, "train")

    run.start_monitor()
    optimizer = make_optimizer(cfg.optimizer, trainables.groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                               eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, device=run.device)
    run.lr_scheduler = make_lr_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.lr_warmup_steps,
                                         total_steps=cfg.max_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    run.ema = EMA(trainables.parameters(), cfg.ema_decay) if cfg.use_ema else None
    run.optimizer = acc.prepare(optimizer)
    if cfg.fused_backward_pass:
        run.fused = FusedBackward(optimizer, cfg.max_grad_norm)
        if cfg.max_grad_norm > 0:
            run.reporter.warn(f"fused_backward_pass clips each tensor's gradient to {cfg.max_grad_norm} on its own: "
                              "the norm of all gradients together is never known (max_grad_norm 0 turns clipping off).")
    run.micro = MicroBatch(cfg, bundle, run.unet, run.latents, run.prompts, run.device, placement.compute_dtype)
    run.synced = [run.unet] + (run.text_encoders if trainables.te_trained else [])
    run.progress = run.resume()
    run.result = TrainResult("finished", run.step, losses=run.progress.losses)


def loop(run: TrainingRun) -> bool:
    """The optimizer steps up to max_steps; False when the user stopped the run (its state is saved)."""
    cfg, acc, reporter, progress, result = run.cfg, run.acc, run.reporter, run.progress, run.result
    procs = f", {acc.num_processes} processes" if acc.num_processes > 1 else ""
    precision = describe_precision(run.placement.mode)
    reporter.stage(f"training on {run.device.type} ({precision}, {run.attention} attention{procs}; "
                   f"{run.placement.describe()})")
    reporter.start(progress.step, cfg.max_steps, list(progress.losses))
    run.first_step, run.started = progress.step, time.time()
    while progress.step < cfg.max_steps:
        loss = _optimizer_step(run)
        run.lr_scheduler.step()
        if run.ema is not None:
            run.ema.update(run.trainables.parameters(), progress.step)
        progress.step += 1
        progress.losses.append([progress.step, loss])
        reporter.progress(progress.step, cfg.max_steps, loss, run.lr_scheduler.get_last_lr()[0])
        step = progress.step
        if not acc.is_main_process or step >= cfg.max_steps:
            continue  # the last step's samples and saves are finish()'s
        if _due(cfg.sample_every, step):
            result.samples += run.samples()
            run.measure()
        if _due(cfg.save_state_every, step):
            run.save_state()
        if _due(cfg.save_model_every, step):
            result.outputs += run.model_during_run()
        if reporter.should_stop():
            run.save_state()
            if cfg.save_model_on_interrupt:
                result.outputs += run.model_on_interrupt()
            reporter.stage(f"stopped at step {step}; the state is saved, run again to resume")
            result.status, result.step = "cancelled", step
            return False
    return True


def finish(run: TrainingRun) -> TrainResult:
    """The last samples and model files; the state only when the settings keep states or the model is lost."""
    cfg, acc, reporter, result = run.cfg, run.acc, run.reporter, run.result
    acc.wait_for_everyone()
    result.step = run.step
    if not acc.is_main_process:
        return result
    trained = run.step > run.first_step
    if trained:
        reporter.stage(f"trained {run.step - run.first_step} steps in {time.time() - run.started:.1f} s")
    # the state (about 3x the model) is written at the end only when the settings keep states;
    # otherwise only if the model cannot be written, so the training is never lost
    keep_state = trained and cfg.save_state_every > 0
    state_error = run.try_save_state() if keep_state else None
    if cfg.sample_every:
        result.samples += run.samples()
        result.best_step = run.measure(last=True)
    result.outputs += run.final_model(state_error, save_state_if_lost=trained and not keep_state)
    result.outputs = [p for p in result.outputs if Path(p).exists()]  # keep_last_models removed the rest
    return result


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def _optimizer_step(run: TrainingRun) -> float:
    """Accumulated micro-batches, clipping and one optimizer step; returns the mean loss.

    The loss stays on the device until the step is done: one host sync per step, not per micro-batch.
    """
    cfg, acc, step, optimizer = run.cfg, run.acc, run.step, run.optimizer
    accumulate = cfg.gradient_accumulation_steps
    te_grad = run.trainables.te_trained and not (cfg.text_encoder_stop_step and step >= cfg.text_encoder_stop_step)
    if run.fused is not None:
        return _fused_step(run, te_grad)
    total = torch.zeros((), device=acc.device)
    for a in range(accumulate):
        index = (step * accumulate + a) * acc.num_processes + acc.process_index
        with _no_sync(acc, run.synced, a == accumulate - 1), acc.autocast():
            loss = run.micro.loss(run.instances, run.classes, index, te_grad)  # + prior_loss_weight * class loss
        acc.backward(loss / accumulate)
        total += loss.detach().float()
    total_value = total.item()  # the step's one host sync
    if not math.isfinite(total_value):
        optimizer.zero_grad(set_to_none=True)  # these gradients never reach the weights
        raise UserError(non_finite_message(cfg, step + 1, total_value, str(acc.mixed_precision)))
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(run.trainables.parameters(), cfg.max_grad_norm)
    optimizer.step()
    # the wrapped optimizer's own zero_grad: accelerate's inspects a signature at every call
    getattr(optimizer, "optimizer", optimizer).zero_grad(set_to_none=True)
    if acc.num_processes > 1:
        return acc.reduce(total / accumulate, reduction="mean").item()
    return total_value / accumulate


def _fused_step(run: TrainingRun, te_grad: bool) -> float:
    """One micro-batch whose backward pass updates the weights; the loss is checked before any weight changes."""
    cfg, acc, step = run.cfg, run.acc, run.step
    with acc.autocast():
        loss = run.micro.loss(run.instances, run.classes, step, te_grad)
    value = loss.item()  # the step's one host sync, before the weights change
    if not math.isfinite(value):
        raise UserError(non_finite_message(cfg, step + 1, value, str(acc.mixed_precision)))
    with run.fused.armed():
        acc.backward(loss)
    return value


def _no_sync(acc, modules, sync: bool):
    """Gradients of the data-parallel modules are averaged across processes only at the last micro-batch."""
    stack = contextlib.ExitStack()
    if not sync:
        for m in modules:
            stack.enter_context(acc.no_sync(m))
    return stack


def _class_images(run: TrainingRun) -> None:
    cfg, reporter, acc = run.cfg, run.reporter, run.acc
    jobs = class_jobs_from_config(cfg)
    if not jobs or cfg.class_image_generator == "webui":  # the WebUI's txt2img made them before the run
        return
    with _main_first(acc):
        if acc.is_main_process:
            made = ensure_class_images(
                run.bundle, jobs, steps=cfg.class_image_steps, guidance=cfg.class_image_guidance,
                batch_size=cfg.class_image_batch_size, negative_prompt=cfg.class_image_negative_prompt,
                resolution=cfg.resolution, seed=cfg.seed,
                progress=lambda d, t, msg: reporter.stage("class images", d, t), should_stop=reporter.should_stop,
                autocast=run.placement.autocast, text=run.text_options())
            if sum(made.values()):
                reporter.stage(f"generated {sum(made.values())} class images")
            if reporter.should_stop():
                raise Cancelled()


def _latent_source(run: TrainingRun) -> LatentSource:
    """The latents the run will use, from the workspace's cache or encoded in batches; only views it shows."""
    cfg, reporter, acc = run.cfg, run.reporter, run.acc
    vae = run.bundle.vae
    if not cfg.cache_latents:
        return LatentSource(vae, cfg, False)
    latents = LatentSource(vae, cfg, True, DiskCache(run.workspace / "latents", vae, reporter.warn))
    if acc.device.type == "cpu" and ENCODE_AT_FIRST_USE_ON_CPU:
        # the VAE stays where the steps run: each view is encoded (or read back) at its first use, so
        # the first step comes as early as it can and the total is the same
        return latents
    total = cfg.max_steps * cfg.gradient_accumulation_steps * acc.num_processes
    views = used_views(run.instances, total, cfg) + used_views(run.classes, total, cfg)

    def stage_or_stop(done, total_views):
        reporter.stage("caching latents", done, total_views)
        if reporter.should_stop():
            raise Cancelled()

    latents.precompute(views, stage_or_stop)
    return latents


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
    # SDXL's first text encoder feeds its penultimate layer only: its last layer gets no gradient
    return [DistributedDataParallelKwargs(find_unused_parameters=cfg.text_encoder_mode != "frozen")]


@contextlib.contextmanager
def _main_first(acc):
    """The main process does shared work (conversion, class images) while the others wait."""
    if not acc.is_main_process:
        acc.wait_for_everyone()
    yield
    if acc.is_main_process:
        acc.wait_for_everyone()

"""A single-file base is built in memory: the same modules, tokenizers, scheduler and written checkpoints
bit for bit as converting it to a diffusers folder and loading that, and no folder is written."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth_ext.bridge import single_file_to_diffusers
from dreambooth_ext.bridge.to_diffusers import open_single_file
from dreambooth_ext.bridge.to_single import diffusers_to_single_file
from dreambooth_ext.errors import UserError
from dreambooth_ext.train.models import build_bundle, load_bundle, open_base

BF16 = {"unet": torch.bfloat16, "vae": torch.bfloat16, "text_encoder": torch.bfloat16}
PROMPTS = ["a photo of sks dog", "", "A very, very LONG prompt! " * 12, "émoji 🐶 and <|endoftext|>"]


def _tensors(module):
    out = dict(module.state_dict())
    out.update({f"buffer:{k}": v for k, v in module.named_buffers()})
    return out


def _same_module(a, b, label):
    ta, tb = _tensors(a), _tensors(b)
    assert list(ta) == list(tb), label
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and ta[key].device == tb[key].device, (label, key)
        assert torch.equal(ta[key], tb[key]), (label, key)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and pa.requires_grad == pb.requires_grad and pa.is_contiguous() == pb.is_contiguous()
    assert a.training == b.training, label


def _config(module):
    cfg = dict(module.config) if hasattr(module.config, "keys") else module.config.to_dict()
    cfg.pop("_name_or_path", None)
    return cfg


def _same_bundle(mem, disk):
    assert mem.family == disk.family and mem.prediction_type == disk.prediction_type
    for label in ("unet", "vae"):
        _same_module(getattr(mem, label), getattr(disk, label), label)
        assert _config(getattr(mem, label)) == _config(getattr(disk, label)), label
    assert len(mem.text_encoders) == len(disk.text_encoders)
    for i, (a, b) in enumerate(zip(mem.text_encoders, disk.text_encoders)):
        _same_module(a, b, f"text_encoder {i}")
        assert type(a) is type(b) and a.config.to_dict() == b.config.to_dict()
    for a, b in zip(mem.tokenizers, disk.tokenizers):
        assert type(a) is type(b) and a.get_vocab() == b.get_vocab() and a.bpe_ranks == b.bpe_ranks
        assert a.special_tokens_map == b.special_tokens_map and a.model_max_length == b.model_max_length
        assert a.pad_token_id == b.pad_token_id
        for prompt in PROMPTS:
            assert a(prompt, padding="max_length", truncation=True).input_ids == \
                b(prompt, padding="max_length", truncation=True).input_ids
    assert mem.scheduler_config == disk.scheduler_config
    assert dict(mem.noise_scheduler.config) == dict(disk.noise_scheduler.config)
    assert type(mem.noise_scheduler) is type(disk.noise_scheduler)
    assert torch.equal(mem.noise_scheduler.alphas_cumprod, disk.noise_scheduler.alphas_cumprod)


@pytest.mark.parametrize("dtypes", [None, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_built_in_memory_equals_loading_the_converted_folder(tiny_checkpoints, tmp_path, family, dtypes):
    ck = tiny_checkpoints(family)
    single_file_to_diffusers(ck, tmp_path / "folder", progress=lambda _m: None)
    disk = load_bundle(tmp_path / "folder", dtypes=dtypes)
    mem = open_base(str(ck), tmp_path / "work", dtypes=dtypes, progress=lambda _m: None)
    assert mem.folder is None and not (tmp_path / "work").exists()
    _same_bundle(mem, disk)
    # what a merge and a save start from: the base's stored weights, component by component
    for comp in ["unet", "vae"] + [f"text_encoder{'' if i == 0 else f'_{i + 1}'}" for i in range(len(mem.text_encoders))]:
        a, b = mem.base_state_dict(comp), disk.base_state_dict(comp)
        assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), comp


def test_a_pickled_checkpoint_builds_the_same_modules_and_never_shares_its_tensors(tiny_checkpoints, tmp_path):
    state = load_file(str(tiny_checkpoints("sd1")))
    ck = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state}, str(ck))
    shutil.copy(tiny_checkpoints("sd1").with_suffix(".yaml"), ck.with_suffix(".yaml"))
    single_file_to_diffusers(ck, tmp_path / "folder", progress=lambda _m: None)
    opened = open_single_file(ck)
    mem = build_bundle(opened)
    _same_bundle(mem, load_bundle(tmp_path / "folder"))
    kept = {k: v.clone() for k, v in opened.source._tensors.items()}
    with torch.no_grad():
        for m in [mem.unet, mem.vae] + mem.text_encoders:
            for p in m.parameters():
                p.add_(1.0)  # training in place must leave the checkpoint's own tensors alone
    assert all(torch.equal(opened.source._tensors[k], v) for k, v in kept.items())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_written_checkpoint_is_the_one_the_folder_gives(tiny_checkpoints, tmp_path, family):
    ck = tiny_checkpoints(family)
    single_file_to_diffusers(ck, tmp_path / "folder", progress=lambda _m: None)
    mem = open_base(str(ck), tmp_path / "work", progress=lambda _m: None)
    torch.manual_seed(0)
    trained = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
               for k, v in mem.unet.state_dict().items()}
    kwargs = dict(dtype="fp16", keep_ema=False, metadata={"dreambooth_ext.steps": "6"}, replace={"unet": trained},
                  progress=lambda _m: None)
    a = mem.write_single_file(tmp_path / "out" / "a.safetensors", **kwargs)
    b = diffusers_to_single_file(tmp_path / "folder", tmp_path / "out" / "b.safetensors", **kwargs)
    assert (a.yaml_path is None) == (b.yaml_path is None) and a.tensors == b.tensors and a.notes == b.notes
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        assert fa.read() == fb.read()  # header, metadata and every tensor
    if a.yaml_path:
        assert open(a.yaml_path).read() == open(b.yaml_path).read()
    # and the .ckpt form holds the same tensors in the same order
    a = torch.load(mem.write_single_file(tmp_path / "out" / "a.ckpt", **kwargs).path, weights_only=True)
    b = torch.load(diffusers_to_single_file(tmp_path / "folder", tmp_path / "out" / "b.ckpt", **kwargs).path,
                   weights_only=True)
    assert list(a["state_dict"]) == list(b["state_dict"]) and a["dreambooth_ext_metadata"] == b["dreambooth_ext_metadata"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_refusals_read_as_the_conversions_do(tiny_checkpoints, tmp_path):
    from tests.trainer_helpers import with_one_nan

    bad = tmp_path / "bad.safetensors"
    state = with_one_nan(tiny_checkpoints("sd1"), bad, "first_stage_model.")
    key = next(k for k in state if k.startswith("first_stage_model.") and state[k].is_floating_point())
    with pytest.raises(UserError) as converting:
        single_file_to_diffusers(bad, tmp_path / "folder", progress=lambda _m: None)
    with pytest.raises(UserError) as building:
        open_base(str(bad), tmp_path / "work", progress=lambda _m: None)
    assert str(building.value) == str(converting.value) and "NaN or infinite" in str(building.value)

    del state[key]  # a missing weight: the shapes check refuses it before any tensor is read
    save_file(state, str(bad))
    with pytest.raises(UserError) as converting:
        single_file_to_diffusers(bad, tmp_path / "folder", progress=lambda _m: None)
    with pytest.raises(UserError) as building:
        open_base(str(bad), tmp_path / "work", progress=lambda _m: None)
    assert str(building.value) == str(converting.value)
    assert not (tmp_path / "work").exists() and not (tmp_path / "folder").exists()


def test_a_stop_while_building_cancels(tiny_checkpoints, tmp_path):
    from dreambooth_ext.errors import Cancelled

    asked = []
    with pytest.raises(Cancelled):
        open_base(str(tiny_checkpoints("sd1")), tmp_path / "work", progress=lambda _m: None,
                  should_stop=lambda: asked.append(1) or len(asked) > 3)


def test_a_diffusers_folder_is_loaded_and_checked(tiny_checkpoints, tmp_path):
    single_file_to_diffusers(tiny_checkpoints("sd1"), tmp_path / "folder", progress=lambda _m: None)
    said = []
    bundle = open_base(str(tmp_path / "folder"), tmp_path / "work", progress=said.append)
    assert bundle.folder == tmp_path / "folder" and bundle.source is None
    assert said == [f"loading {tmp_path / 'folder'}"]


def _convert_and_load_in_runs(monkeypatch):
    """run.py's loading of the base as it was before open_base: a converted folder in the workspace, loaded."""
    from dreambooth_ext.train import run
    from dreambooth_ext.train.models import prepare_base

    def load(checkpoint, workspace, family, dtypes, devices, progress, should_stop):
        folder = prepare_base(checkpoint, workspace, family, progress=progress, should_stop=should_stop)
        return load_bundle(folder, dtypes=dtypes)

    monkeypatch.setattr(run, "open_base", load)


def _written(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "modelspec.date"}
        return meta, {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_run_from_a_single_file_writes_no_base_folder_and_the_same_model(tiny_checkpoints, tmp_path, monkeypatch,
                                                                             mode):
    from tests.recording import RecordingReporter
    from tests.trainer_helpers import small_config
    from dreambooth_ext.train.run import train

    extra = dict(text_encoder_mode="full", text_encoder_lr=1e-4) if mode == "full" else \
        dict(train_mode="lora", lora_rank=4, lora_learning_rate=1e-2, text_encoder_mode="lora", save_lora_merged=True)
    results = {}
    for way in ("folder", "memory"):
        with monkeypatch.context() as patch:
            if way == "folder":
                _convert_and_load_in_runs(patch)
            cfg = small_config(tmp_path / way, tiny_checkpoints("sd1"), max_steps=3, **extra)
            result = train(cfg, RecordingReporter())
        assert result.status == "finished"
        assert (cfg.workspace_path() / "base" / "model").exists() == (way == "folder")
        results[way] = sorted(result.outputs)
    assert [p.replace(str(tmp_path / "folder"), "") for p in results["folder"]] == \
        [p.replace(str(tmp_path / "memory"), "") for p in results["memory"]]
    for a, b in zip(results["folder"], results["memory"]):
        meta_a, tensors_a = _written(a)
        meta_b, tensors_b = _written(b)
        assert meta_a == meta_b and list(tensors_a) == list(tensors_b), a
        assert all(tensors_a[k].dtype == tensors_b[k].dtype and torch.equal(tensors_a[k], tensors_b[k])
                   for k in tensors_a), a
        yaml_a, yaml_b = Path(a).with_suffix(".yaml"), Path(b).with_suffix(".yaml")
        assert yaml_a.is_file() == yaml_b.is_file()
        assert not yaml_a.is_file() or yaml_a.read_text() == yaml_b.read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_built_on_the_device_equals_loading_then_moving(tiny_checkpoints, tmp_path, family):
    ck = tiny_checkpoints(family)
    single_file_to_diffusers(ck, tmp_path / "folder", progress=lambda _m: None)
    dtypes = {"unet": torch.bfloat16, "vae": torch.float32, "text_encoder": torch.float16}
    disk = load_bundle(tmp_path / "folder", dtypes=dtypes)
    for m in [disk.unet, disk.vae] + disk.text_encoders:
        m.to("cuda")
    cuda = torch.device("cuda", torch.cuda.current_device())
    mem = open_base(str(ck), tmp_path / "work", dtypes=dtypes, progress=lambda _m: None,
                    devices={"unet": cuda, "vae": cuda, "text_encoder": cuda})
    _same_bundle(mem, disk)


def test_a_stop_while_a_run_builds_its_base_cancels_it(tiny_checkpoints, tmp_path):
    from tests.recording import RecordingReporter
    from tests.trainer_helpers import small_config
    from dreambooth_ext.train.run import train

    class StopWhileLoading(RecordingReporter):
        def should_stop(self):
            return any(s.startswith("loading ") for s in self.stages)

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), num_class_images=0)
    reporter = StopWhileLoading()
    result = train(cfg, reporter)
    assert result.status == "cancelled" and result.step == 0
    assert "stopped before training began" in reporter.stages[-1]
    assert not (cfg.workspace_path() / "base").exists() and not (cfg.workspace_path() / "run.lock").exists()


def test_a_conversion_the_workspace_already_holds_is_loaded(tiny_checkpoints, tmp_path):
    from dreambooth_ext.train.models import prepare_base

    ck = tiny_checkpoints("sd1")
    folder = prepare_base(str(ck), tmp_path / "work", progress=lambda _m: None)  # what earlier runs left
    said = []
    bundle = open_base(str(ck), tmp_path / "work", progress=said.append)
    assert bundle.folder == folder and said == [f"loading {folder}"]
    _same_bundle(bundle, open_base(str(ck), tmp_path / "other", progress=lambda _m: None))
    # another family asked for than the conversion was made with: built from the file
    assert open_base(str(ck), tmp_path / "work", "sd1", progress=lambda _m: None).folder is None


def test_a_pickled_base_is_converted_once_so_the_run_does_not_hold_the_whole_file(tiny_checkpoints, tmp_path):
    state = load_file(str(tiny_checkpoints("sd1")))
    ck = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state}, str(ck))
    shutil.copy(tiny_checkpoints("sd1").with_suffix(".yaml"), ck.with_suffix(".yaml"))
    bundle = open_base(str(ck), tmp_path / "work", progress=lambda _m: None)
    assert bundle.source is None and bundle.folder == tmp_path / "work" / "base" / "model"
    _same_bundle(bundle, build_bundle(open_single_file(ck)))

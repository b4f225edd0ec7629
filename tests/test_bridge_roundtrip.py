"""Single file -> diffusers -> single file is bit-exact, for every family and the variants real files have."""

import json

import pytest
import torch

from dreambooth_ext.bridge import diffusers_to_single_file, single_file_to_diffusers
from dreambooth_ext.bridge.diffusers_folder import EXTRAS, SIDECAR
from tests.conftest import FAMILIES
from tests.helpers import assert_same_state, load_any, write_variant


def round_trip(src, tmp_path, suffix=".safetensors", **kwargs):
    folder = tmp_path / "diffusers"
    single_file_to_diffusers(src, folder, **kwargs)
    out = tmp_path / ("back" + suffix)
    diffusers_to_single_file(folder, out)
    return folder, out


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(family, tiny_checkpoints, tmp_path):
    src = tiny_checkpoints(family)
    folder, out = round_trip(src, tmp_path)
    assert_same_state(load_any(src), load_any(out))
    sidecar = json.loads((folder / SIDECAR).read_text())
    assert sidecar["family"] == family
    expected = "v_prediction" if family == "sd2-v" else "epsilon"
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_half_precision_files_round_trip(family, dtype, tiny_checkpoints, tmp_path):
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_any(tiny_checkpoints(family)).items()}
    src = write_variant(tiny_checkpoints(family), tmp_path / "in" / "half.safetensors", state)
    _, out = round_trip(src, tmp_path)
    assert_same_state(state, load_any(out))


def test_ckpt_with_state_dict_wrapper_and_ema(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints("sd1")
    state = load_any(base)
    # EMA copies use flattened names in real files
    ema = {"model_ema." + k[len("model.diffusion_model."):].replace(".", ""): v.clone()
           for k, v in state.items() if k.startswith("model.diffusion_model.")}
    state.update(ema)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    src = write_variant(base, tmp_path / "in" / "wrapped.ckpt", state)
    folder, out = round_trip(src, tmp_path, suffix=".ckpt")
    assert_same_state(state, load_any(out))
    report_keys = load_any(folder / EXTRAS)
    assert set(report_keys) == set(ema) | {"model_ema.decay", "model_ema.num_updates"}
    # a trainer drops the stale EMA when writing its result
    dropped = diffusers_to_single_file(folder, tmp_path / "no-ema.safetensors", keep_ema=False)
    assert not any(k.startswith("model_ema.") for k in load_any(dropped.path))
    assert dropped.notes and "EMA" in dropped.notes[0]


def test_legacy_text_encoder_keys_and_missing_position_ids(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints("sd1")
    state = {}
    for k, v in load_any(base).items():
        if k.endswith("position_ids"):
            continue
        state[k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")] = v
    assert any(k.startswith("cond_stage_model.transformer.embeddings.") for k in state)
    src = write_variant(base, tmp_path / "in" / "legacy.safetensors", state)
    folder, out = round_trip(src, tmp_path)
    assert_same_state(state, load_any(out))
    te = load_any(folder / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in te)


def test_inpainting_checkpoint_keeps_nine_channels(tmp_path):
    from dreambooth_ext.tiny import build_models, save_diffusers, tiny_family
    from dreambooth_ext.bridge.ldm_yaml_write import generate_yaml

    fam = tiny_family("sd2")
    fam["unet"]["in_channels"] = 9
    folder = save_diffusers(fam, build_models(fam), tmp_path / "made", {"family": "sd2", "yaml_text": generate_yaml(fam)})
    src = tmp_path / "inpaint.safetensors"
    diffusers_to_single_file(folder, src)
    assert load_any(src)["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    report = single_file_to_diffusers(src, tmp_path / "back")
    assert report.inpainting
    assert json.loads((tmp_path / "back" / "unet" / "config.json").read_text())["in_channels"] == 9
    diffusers_to_single_file(tmp_path / "back", tmp_path / "again.safetensors")
    assert_same_state(load_any(src), load_any(tmp_path / "again.safetensors"))


def test_dtype_option_casts_floats_only(tiny_checkpoints, tmp_path):
    # an integer position_ids buffer, as most SD1 files carry (transformers 4.46 no longer saves one)
    state = load_any(tiny_checkpoints("sd1"))
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    src = write_variant(tiny_checkpoints("sd1"), tmp_path / "in" / "ids.safetensors", state)
    folder = tmp_path / "d"
    single_file_to_diffusers(src, folder, dtype="fp16")
    unet = load_any(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in unet.values()} == {torch.float16}
    te = load_any(folder / "text_encoder" / "model.safetensors")
    assert te["text_model.embeddings.position_ids"].dtype == torch.int64
    out = diffusers_to_single_file(folder, tmp_path / "x.safetensors", dtype="bf16")
    assert {v.dtype for k, v in load_any(out.path).items() if v.is_floating_point()} == {torch.bfloat16}


def test_transformers5_text_encoder_folder_is_mapped(tiny_checkpoints, tmp_path):
    """transformers 5 drops the `text_model.` level; 4.x would load such weights as random."""
    from safetensors.torch import save_file

    src = tiny_checkpoints("sd1")
    folder, _ = round_trip(src, tmp_path)
    te_path = folder / "text_encoder" / "model.safetensors"
    te = load_any(te_path)
    save_file({k.replace("text_model.", "", 1): v for k, v in te.items()}, str(te_path))
    out = diffusers_to_single_file(folder, tmp_path / "v5.safetensors")
    assert_same_state(load_any(src), load_any(out.path))

    from dreambooth_ext.bridge.diffusers_folder import component_state_dict

    assert set(component_state_dict(folder, "text_encoder")) == set(te)


def test_metadata_and_v_prediction_yaml(tiny_checkpoints, tmp_path):
    from safetensors import safe_open

    folder = tmp_path / "d"
    single_file_to_diffusers(tiny_checkpoints("sd2-v"), folder)
    (folder / SIDECAR).write_text(json.dumps({**json.loads((folder / SIDECAR).read_text()), "yaml_text": None}))
    out = diffusers_to_single_file(folder, tmp_path / "v.safetensors", metadata={"dreambooth_ext.steps": 10})
    with safe_open(out.path, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v_prediction"
    assert meta["dreambooth_ext.source_name"] == "tiny-sd2-v.safetensors"
    assert len(meta["dreambooth_ext.source_sha256"]) == 64
    assert meta["dreambooth_ext.steps"] == "10"
    text = (tmp_path / "v.yaml").read_text()
    assert "parameterization" in text and "v" in text


def test_position_ids_survive_whatever_transformers_keeps(tiny_checkpoints, tmp_path):
    """transformers 4.46 models no longer hold position_ids; a file that has them keeps them anyway."""
    state = load_any(tiny_checkpoints("sd1"))
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    src = write_variant(tiny_checkpoints("sd1"), tmp_path / "in" / "ids.safetensors", state)
    _, out = round_trip(src, tmp_path)
    assert_same_state(state, load_any(out))

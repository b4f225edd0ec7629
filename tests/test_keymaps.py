"""The key tables, checked row by row against diffusers' own single-file converters on the real architectures."""

import pytest
import torch

from dreambooth_ext.bridge.components import components_for
from dreambooth_ext.bridge.family_data import load_family
from tests.conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_tables_are_one_to_one_and_cover_every_weight(family):
    for comp in components_for(load_family(family)):
        singles = [r.single for r in comp.rows]
        diffusers = [d for r in comp.rows for d in r.diffusers]
        assert len(singles) == len(set(singles)), comp.name
        assert len(diffusers) == len(set(diffusers)), comp.name
        mapped = set(diffusers)
        assert set(comp.shapes) - mapped <= {"text_model.embeddings.position_ids"}, comp.name
        assert all(s.startswith(comp.single_prefix) for s in singles)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_unet_and_vae_rows_agree_with_diffusers_converters(family):
    """Label every LDM key with its row number, run diffusers' converter, and read the labels back."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    fam = load_family(family)
    unet, vae = components_for(fam)[:2]
    labelled = {r.single: torch.tensor([float(i)]) for i, r in enumerate(unet.rows)}
    out = convert_ldm_unet_checkpoint(labelled, fam["unet"])
    assert set(out) == set(unet.shapes)
    for i, r in enumerate(unet.rows):
        assert out[r.diffusers[0]].item() == i, r

    labelled = {r.single: torch.full((1, 1, 1, 1) if r.op != "copy" else (1,), float(i)) for i, r in enumerate(vae.rows)}
    out = convert_ldm_vae_checkpoint(labelled, fam["vae"])
    assert set(out) == set(vae.shapes)
    for i, r in enumerate(vae.rows):
        assert out[r.diffusers[0]].flatten()[0].item() == i, r


def test_sd2_text_rows_leave_the_unused_last_layer_aside():
    te = components_for(load_family("sd2"))[2]
    singles = {r.single for r in te.rows}
    assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in singles
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" not in singles
    assert "cond_stage_model.model.text_projection" not in singles  # SD2 has no use for it


def test_sdxl_second_encoder_maps_projection_transposed():
    te2 = components_for(load_family("sdxl"))[3]
    row = next(r for r in te2.rows if r.single.endswith("text_projection"))
    assert row.op == "transpose" and row.diffusers == ("text_projection.weight",)

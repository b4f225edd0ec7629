"""VAE table: the LDM `first_stage_model.*` layout <-> diffusers AutoencoderKL."""

from typing import Dict, List, Sequence, Tuple

from dreambooth_ext.bridge.keymap import CONV_TO_LINEAR, COPY, Row, rows_from_module_map

# diffusers Attention (in the mid block) -> LDM AttnBlock, which uses 1x1 convolutions
ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_module_map(config: dict) -> Dict[str, str]:
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    modules = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_in"] = f"{part}.conv_in"
        modules[f"{part}.conv_out"] = f"{part}.conv_out"
        modules[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        modules[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        modules[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        modules[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for level in range(levels):
        for j in range(layers):
            modules[f"encoder.down_blocks.{level}.resnets.{j}"] = f"encoder.down.{level}.block.{j}"
        if level < levels - 1:
            modules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
        # the LDM decoder numbers its levels from the lowest resolution up
        ldm_level = levels - 1 - level
        for j in range(layers + 1):
            modules[f"decoder.up_blocks.{level}.resnets.{j}"] = f"decoder.up.{ldm_level}.block.{j}"
        if level < levels - 1:
            modules[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{ldm_level}.upsample.conv"
    return modules


def _rename(prefix: str, rest: str) -> Tuple[str, str]:
    if prefix.endswith("attentions.0"):
        for new, old in ATTENTION_RENAMES.items():
            if rest.startswith(new + "."):
                tail = rest[len(new) + 1 :]
                op = CONV_TO_LINEAR if (tail == "weight" and new != "group_norm") else COPY
                return old + "." + tail, op
    if ".resnets." in prefix and rest.startswith("conv_shortcut."):
        return "nin_shortcut." + rest[len("conv_shortcut.") :], COPY
    return rest, COPY


def vae_rows(config: dict, diffusers_keys: Sequence[str]) -> List[Row]:
    """Rows for every key of the diffusers VAE; single-file side without `first_stage_model.`."""
    return rows_from_module_map(diffusers_keys, vae_module_map(config), _rename)

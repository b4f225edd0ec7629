"""UNet table: the LDM `model.diffusion_model.*` layout <-> diffusers UNet2DConditionModel.

The table is generated from the diffusers config (levels, resnets per level, which
levels have attention), so the same code serves SD1, SD2, SDXL and any size between.
"""

from typing import Dict, List, Sequence, Tuple

from dreambooth_ext.bridge.keymap import COPY, Row, rows_from_module_map

# diffusers ResnetBlock2D name -> LDM ResBlock name
RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

FIXED_MODULES = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text + size embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
}


def _per_level(value, levels: int) -> List[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def unet_module_map(config: dict) -> Dict[str, str]:
    """diffusers module path -> LDM module path, for one UNet config."""
    down_types = config["down_block_types"]
    up_types = config["up_block_types"]
    levels = len(down_types)
    layers = _per_level(config["layers_per_block"], levels)
    modules = dict(FIXED_MODULES)

    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(down_types):
        for j in range(layers[level]):
            modules[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{index}.0"
            if block_type.startswith("CrossAttn"):
                modules[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    up_layers = list(reversed(layers))
    index = 0
    for level, block_type in enumerate(up_types):
        has_attention = block_type.startswith("CrossAttn")
        for j in range(up_layers[level] + 1):
            modules[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{index}.0"
            if has_attention:
                modules[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == up_layers[level] and level < levels - 1:
                slot = 2 if has_attention else 1
                modules[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return modules


def _rename(prefix: str, rest: str) -> Tuple[str, str]:
    if ".resnets." in prefix:
        head, _, tail = rest.partition(".")
        return RESNET_RENAMES.get(head, head) + "." + tail, COPY
    return rest, COPY  # attention blocks share their inner names between the layouts


def unet_rows(config: dict, diffusers_keys: Sequence[str]) -> List[Row]:
    """Rows for every key of the diffusers UNet; single-file side without the `model.diffusion_model.` prefix."""
    return rows_from_module_map(diffusers_keys, unet_module_map(config), _rename)

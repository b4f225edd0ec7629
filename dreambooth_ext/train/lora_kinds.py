"""The network kinds a layer of a LoRA file may hold, told apart the way the WebUI's Lora extension does it.

A1111's extensions-builtin/Lora/networks.py `load_network` groups a file's keys by layer (the key up to its
first ".") and gives each layer to the first of `module_types` whose `create_module` accepts the layer's
parts: network_lora.py takes `lora_up.weight` + `lora_down.weight` (newer versions also peft's
`lora_A`/`lora_B` names, which are not read here), network_hada.py the four `hada_w*`
parts, network_ia3.py `weight`, network_lokr.py a `lokr_w1` (or `lokr_w1_a` + `lokr_w1_b`) with a `lokr_w2`
(or its pair), network_full.py `diff`, network_norm.py `w_norm` + `b_norm`, network_glora.py its `a1/a2/b1/b2`
weights with `alpha`, network_oft.py `oft_blocks` or `oft_diag`. KINDS holds the same kinds in the same
order; `kind_of` picks a layer's kind as the WebUI does. A run can start from (`init_lora`) the kinds
marked `trainable`, and only from layers with no part beyond the kind's own (a DoRA `dora_scale`, a
CP-decomposed `lora_mid.weight`); lora_export refuses every other layer by its kind's name.
"""

from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class NetworkKind:
    name: str
    label: str  # as users know it
    needs: Tuple[Tuple[str, ...], ...]  # a layer is of this kind when it has every part of one of these
    optional: Tuple[str, ...] = ()  # parts it may have besides
    trainable: bool = False  # lora_export reads it into adapters a run trains on

    def accepts(self, parts: Collection[str]) -> bool:
        return any(all(p in parts for p in alternative) for alternative in self.needs)

    @property
    def parts(self) -> Tuple[str, ...]:
        """Every part a layer of this kind may have."""
        return tuple(dict.fromkeys(p for alternative in self.needs for p in alternative)) + self.optional

    def extra(self, parts: Collection[str]) -> List[str]:
        """The layer's parts this kind does not read (e.g. DoRA's dora_scale on a LoRA layer)."""
        return sorted(set(parts) - set(self.parts))


LORA = NetworkKind("lora", "LoRA", (("lora_up.weight", "lora_down.weight"),), optional=("alpha",), trainable=True)
KINDS: Tuple[NetworkKind, ...] = (
    LORA,
    NetworkKind("loha", "LoHa", (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),)),
    NetworkKind("ia3", "IA3", (("weight",),)),
    NetworkKind("lokr", "LoKr", tuple((w1 + w2) for w1 in (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b"))
                                      for w2 in (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b")))),
    NetworkKind("full", "full (diff)", (("diff",),)),
    NetworkKind("norm", "norm", (("w_norm", "b_norm"),)),
    NetworkKind("glora", "GLoRA", (("a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight"),)),
    NetworkKind("oft", "OFT", (("oft_blocks",), ("oft_diag",))),
)
BY_NAME: Dict[str, NetworkKind] = {kind.name: kind for kind in KINDS}


def kind_of(parts: Collection[str]) -> Optional[NetworkKind]:
    """The kind of a layer with these parts: the first of KINDS that accepts them, as the WebUI picks; None if none."""
    return next((kind for kind in KINDS if kind.accepts(parts)), None)


def refused_labels() -> str:
    """The kinds a run cannot start from, for a sentence: "LoHa, IA3, ... and OFT"."""
    labels = [kind.label for kind in KINDS if not kind.trainable]
    return ", ".join(labels[:-1]) + f" and {labels[-1]}" if len(labels) > 1 else "".join(labels)

"""What a run trains: the UNet fully or through LoRA, and the text encoder(s) frozen, fully or through LoRA."""

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from dreambooth_ext.bridge.components import TEXT_ENCODER, text_encoder_name
from dreambooth_ext.train import lora as lora_lib


@dataclass
class Trainables:
    unet: torch.nn.Module
    text_encoders: List[torch.nn.Module]
    unet_lora: bool
    te_mode: str  # frozen | full | lora
    groups: List[dict] = field(default_factory=list)  # optimizer param groups

    @property
    def te_trained(self) -> bool:
        return self.te_mode != "frozen"

    def parameters(self) -> List[torch.nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]

    def state(self) -> Dict[str, torch.Tensor]:
        """The trained tensors only (LoRA adapters, or whole modules), keyed by module: for resumable state."""
        out = {}
        for name, model, is_lora in self.trained_modules():
            sd = lora_lib.lora_state_dict(model) if is_lora else model.state_dict()
            out.update({f"{name}/{k}": v for k, v in sd.items()})
        return out

    def load(self, state: Dict[str, torch.Tensor]):
        for name, model, is_lora in self.trained_modules():
            sd = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + "/")}
            if is_lora:
                lora_lib.load_lora_state_dict(model, sd)
            else:
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        v.copy_(sd[k])

    def trained_modules(self):
        """(name, module, trained through LoRA) for each module that trains."""
        yield "unet", self.unet, self.unet_lora
        if self.te_trained:
            for i, te in enumerate(self.text_encoders):
                yield text_encoder_name(i), te, self.te_mode == "lora"


def setup_trainables(cfg, bundle, warn=print) -> Trainables:
    """Mark what trains, inject adapters, and build the optimizer's parameter groups.

    New adapters draw their starting weights from the run's seed: the same settings start alike, so a
    resumed run (whose adapters come from the state) ends where an uninterrupted one does."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        if torch.cuda.is_available():  # adapters made on the GPU draw from its generator (every draw of the
            torch.cuda.manual_seed_all(int(cfg.seed))  # run itself uses its own seeded CPU generators)
        return _setup_trainables(cfg, bundle, warn)


def _setup_trainables(cfg, bundle, warn) -> Trainables:
    unet, tes = bundle.unet, bundle.text_encoders
    alpha = float(cfg.effective_lora_alpha)
    unet_lora = cfg.train_mode == "lora"
    if unet_lora:
        lora_lib.add_lora(unet, cfg.lora_targets, cfg.lora_rank, alpha)
        unet_params = list(lora_lib.lora_parameters(unet))
    else:
        unet.requires_grad_(True)
        unet_params = [p for p in unet.parameters()]
    groups = [{"params": unet_params, "lr": cfg.unet_learning_rate, "name": "unet"}]
    te_params: List[torch.nn.Parameter] = []
    if cfg.text_encoder_mode == "full":
        for te in tes:
            te.requires_grad_(True)
            te_params += list(te.parameters())
    elif cfg.text_encoder_mode == "lora":
        for te in tes:
            lora_lib.add_lora(te, cfg.lora_targets, cfg.lora_rank, alpha, is_text_encoder=True)
            te_params += list(lora_lib.lora_parameters(te))
    if te_params:
        groups.append({"params": te_params, "lr": cfg.text_encoder_learning_rate, "name": TEXT_ENCODER})
    if cfg.init_lora:
        from dreambooth_ext.train.lora_export import apply_webui_lora, is_text_encoder_key, load_webui_lora

        earlier = load_webui_lora(cfg.init_lora)
        if cfg.text_encoder_mode != "lora":
            te_keys = [k for k in earlier if is_text_encoder_key(k)]
            if te_keys:
                warn(f"{cfg.init_lora}: its text-encoder layers are not trained on (text encoder mode is "
                     f"{cfg.text_encoder_mode}); they are left out of this run's LoRA")
            earlier = {k: v for k, v in earlier.items() if not is_text_encoder_key(k)}
        apply_webui_lora(unet, tes if cfg.text_encoder_mode == "lora" else [], earlier, bundle.family)
        # adapters the file added are new parameters: rebuild the groups from what is now trainable
        groups[0]["params"] = list(lora_lib.lora_parameters(unet))
        if cfg.text_encoder_mode == "lora":
            groups[1]["params"] = [p for te in tes for p in lora_lib.lora_parameters(te)]
    for m in [unet] + tes:
        m.train(any(p.requires_grad for p in m.parameters()))
    return Trainables(unet, tes, unet_lora, cfg.text_encoder_mode, groups)

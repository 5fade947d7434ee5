"""What each training method adds to a backbone and which parameters it trains.

A method differs by its trainable parameters, extra modules and export format, not by a copy
of the loop: `prepare_method` returns a `MethodState` the one loop works with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from diffbase.config import TrainingConfig
from diffbase.errors import UserError

# Attention projections that LoRA adapts by default, per family (diffusers module names).
_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_JOINT = [*_ATTN, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# Layers LoRA adapts by default, per family: suffixes of diffusers module names, matched against
# Linear layers only. SD1.5/SDXL/SD3 follow diffusers' DreamBooth LoRA scripts (attention only);
# FLUX.1 adds the feed-forward layers as train_dreambooth_lora_flux.py does; FLUX.2 the same, plus
# its fused single-block projections.
LORA_TARGETS: dict[str, list[str]] = {
    "sd15": _ATTN,
    "sdxl": _ATTN,
    "sd3": _JOINT,
    "flux1": [*_JOINT, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    "flux2": [
        *_JOINT,
        "to_qkv_mlp_proj",
        "attn.to_out",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
    ],
}

CONTROLNET_FAMILIES = ("sd15", "sdxl", "sd3", "flux1")


@dataclass
class MethodState:
    name: str
    trainable: list[torch.nn.Parameter]
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # modules whose trained state is saved
    partial: bool = False  # only the parameters that train are saved (the rest is the frozen base)
    loss: Any = None  # the method's own loss(bb, batch, seed, step); None: the standard diffusion loss
    wraps_denoiser: bool = True  # the trained module is the denoiser (calls go through its DDP wrapper)


def trained_state_dict(
    state: MethodState, full: dict[str, torch.Tensor] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """The weights a checkpoint must keep: only what trains (LoRA layers, or whole trained modules).
    `full` is the gathered state dict of the (one) trained module when it is sharded (FSDP, DeepSpeed)."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for name, module in state.modules.items():
        if state.name in ("lora", "dreambooth_lora"):
            out[name] = {k: v.detach() for k, v in get_peft_model_state_dict(module, state_dict=full).items()}
        else:
            state_dict = full if full is not None else module.state_dict()
            if state.partial:
                trains = {n for n, p in module.named_parameters() if p.requires_grad}
                state_dict = {k: v for k, v in state_dict.items() if k in trains}
            out[name] = {k: v.detach() for k, v in state_dict.items()}
    return out


def load_trained_state_dict(state: MethodState, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    from peft.utils import set_peft_model_state_dict

    for name, module in state.modules.items():
        if state.name in ("lora", "dreambooth_lora"):
            result = set_peft_model_state_dict(module, tensors[name])
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"checkpoint: unexpected LoRA keys for {name}: {result.unexpected_keys[:3]}")
        else:
            result = module.load_state_dict(tensors[name], strict=not state.partial)
            if state.partial and result.unexpected_keys:
                raise UserError(f"checkpoint: unexpected keys for {name}: {result.unexpected_keys[:3]}")


def lora_target_names(denoiser: torch.nn.Module, targets: list[str]) -> list[str]:
    """Full names of the Linear layers whose names end with one of `targets` (a `.`-boundary suffix)."""
    linears = [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    found, missing = [], []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        (found if hits else missing).extend(hits or [target])
    if missing:
        raise UserError(f"training.lora.target_modules: {missing} match no Linear layer of the denoiser")
    return sorted(set(found))


def add_lora(denoiser: torch.nn.Module, family: str, cfg: TrainingConfig) -> None:
    from peft import LoraConfig

    targets = lora_target_names(denoiser, cfg.lora.target_modules or LORA_TARGETS[family])
    denoiser.add_adapter(
        LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )
    )


def make_controlnet(denoiser: torch.nn.Module, family: str, cfg: TrainingConfig) -> torch.nn.Module:
    """A ControlNet initialised from the denoiser's weights, as diffusers' training examples do."""
    import diffusers

    c = cfg.controlnet
    if family not in CONTROLNET_FAMILIES:
        raise UserError(
            f"training.method: controlnet is available for {list(CONTROLNET_FAMILIES)}; diffusers "
            f"0.42 has no ControlNet model for {family}"
        )
    if c.pretrained_path:
        cls = {
            "sd15": "ControlNetModel",
            "sdxl": "ControlNetModel",
            "sd3": "SD3ControlNetModel",
            "flux1": "FluxControlNetModel",
        }[family]
        return getattr(diffusers, cls).from_pretrained(c.pretrained_path, local_files_only=True)
    if family in ("sd15", "sdxl"):
        return diffusers.ControlNetModel.from_unet(denoiser)
    if family == "sd3":
        return diffusers.SD3ControlNetModel.from_transformer(
            denoiser,
            num_layers=c.num_layers or max(1, min(12, denoiser.config.num_layers - 1)),
            num_extra_conditioning_channels=0,
        )
    config = denoiser.config
    return diffusers.FluxControlNetModel.from_transformer(
        denoiser,
        num_layers=c.num_layers or min(4, config.num_layers),
        num_single_layers=c.num_single_layers or min(10, config.num_single_layers),
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    )


def prepare_method(backbone: Any, cfg: TrainingConfig) -> MethodState:
    """Freeze the backbone, then add and unfreeze what the method trains."""
    family = backbone.spec.family
    denoiser = backbone.denoiser
    for module in backbone.pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    method = cfg.method
    if method in ("lora", "dreambooth"):
        add_lora(denoiser, family, cfg)
        name = "lora" if method == "lora" else "dreambooth_lora"
        return MethodState(name, [p for p in denoiser.parameters() if p.requires_grad], {"denoiser": denoiser})
    if method == "full_finetune":
        denoiser.requires_grad_(True)
        return MethodState(method, list(denoiser.parameters()), {"denoiser": denoiser})
    if method == "dreamfit":
        from diffbase.dreamfit.train_step import prepare

        if family != "flux1":
            raise UserError(f"training.method: dreamfit trains on FLUX.1, not {family}")
        d = cfg.dreamfit
        loras, loss = prepare(backbone, d.rank, d.mode, cfg.objective, seed=0, prompt=d.prompt)
        backbone.adapters["dreamfit"] = loras
        return MethodState(method, list(loras.parameters()), {"dreamfit": loras}, loss=loss, wraps_denoiser=False)
    if method == "vton":
        from diffbase.tryon.train_step import make_vton_loss
        from diffbase.tryon.vton import prepare_unet

        if family != "sd15":
            raise UserError(f"training.method: vton trains an SD1.5 UNet, not {family}")
        params = prepare_unet(denoiser, cfg.vton.variant)
        return MethodState(method, params, {"denoiser": denoiser}, partial=True, loss=make_vton_loss(cfg.vton))
    if method == "controlnet":
        controlnet = make_controlnet(denoiser, family, cfg).train()
        controlnet.requires_grad_(True)
        return MethodState(method, list(controlnet.parameters()), {"controlnet": controlnet})
    raise UserError(f"training.method: unknown method '{method}'")

"""LoRA on the denoiser (peft), for every family; exported as diffusers and kohya/ComfyUI files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from diffbase.config import Config
from diffbase.errors import UserError
from diffbase.methods import text_to_image
from diffbase.methods.registry import Method, Trained, register
from diffbase.models import families
from diffbase.models.lora_formats import LYCORIS_TYPES


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the family's default (Family.lora_targets)
    # lora; dora (weight-decomposed); rslora (scale alpha / sqrt(rank)); lokr, loha (LyCORIS, exported for ComfyUI)
    type: Literal["lora", "dora", "rslora", "lokr", "loha"] = "lora"
    factor: int = -1  # lokr: the Kronecker factor; -1 splits each layer as evenly as its size allows
    train_text_encoder: bool = False  # a LoRA on the CLIP text encoder(s) too
    text_encoder_lr: float | None = None  # None: training.learning_rate
    init_from: str | None = None  # a LoRA file (diffusers, kohya, LyCORIS) to continue from


def lora_target_names(
    denoiser: torch.nn.Module, targets: list[str], key: str = "training.lora.target_modules"
) -> list[str]:
    """Full names of the Linear layers whose names end with one of `targets` (a `.`-boundary suffix)."""
    linears = [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    found, missing = [], []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        (found if hits else missing).extend(hits or [target])
    if missing:
        raise UserError(f"{key}: {missing} match no Linear layer of the model")
    return sorted(set(found))


def adapter_config(cfg: LoraConfig, targets: list[str]) -> Any:
    """peft's config for the adapter type: LoRA (with DoRA or rsLoRA), LoKr or LoHa."""
    import peft

    if cfg.type == "lokr":
        return peft.LoKrConfig(r=cfg.rank, alpha=cfg.alpha, module_dropout=cfg.dropout, decompose_factor=cfg.factor,
                               target_modules=targets, init_weights=True)  # fmt: skip
    if cfg.type == "loha":
        return peft.LoHaConfig(r=cfg.rank, alpha=cfg.alpha, module_dropout=cfg.dropout, target_modules=targets,
                               init_weights=True)  # fmt: skip
    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights="gaussian",
                           target_modules=targets, use_dora=cfg.type == "dora", use_rslora=cfg.type == "rslora")  # fmt: skip


def add_lora(denoiser: torch.nn.Module, family: str, cfg: LoraConfig) -> None:
    targets = lora_target_names(denoiser, cfg.target_modules or list(families.get(family).lora_targets))
    denoiser.add_adapter(adapter_config(cfg, targets))


# The text encoders' attention projections (CLIP), as diffusers' DreamBooth LoRA scripts adapt them.
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def text_encoder_names(pipeline_cls: type, spec: Any) -> list[str]:
    """The CLIP text encoders the pipeline's LoRA files carry (diffusers' `save_lora_weights` arguments):
    SD1.5, SDXL, SD3 and FLUX.1 have them; T5, Mistral and Qwen encoders are in no LoRA format loaders read."""
    import inspect

    saved = inspect.signature(pipeline_cls.save_lora_weights).parameters
    return [
        t.component for t in spec.text_encoders if t.tokenizer_kind == "clip" and f"{t.component}_lora_layers" in saved
    ]


def check(config: Config) -> None:
    """What the LoRA settings need, checked before anything loads."""
    cfg, t = config.training.lora, config.training
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise UserError(f"training.lora.init_from: {cfg.init_from}: file not found (expected a LoRA .safetensors)")
    if not cfg.train_text_encoder:
        return
    if cfg.type in LYCORIS_TYPES:
        raise UserError(f"training.lora.train_text_encoder: not with type {cfg.type} (its files carry the denoiser "
                        "only); use type lora, dora or rslora")  # fmt: skip
    if t.method not in ("lora", "dreambooth"):
        raise UserError(f"training.lora.train_text_encoder: for methods lora and dreambooth, not {t.method}")
    check_text_encoder_trains(config, "training.lora.train_text_encoder")


def check_text_encoder_trains(config: Config, key: str) -> None:
    """A text encoder that trains is called at every step on the training device."""
    if config.data.cache_text:
        raise UserError(f"data.cache_text: the text encoder trains ({key}), so captions are encoded at each step; "
                        "set data.cache_text: false")  # fmt: skip
    if config.hardware.offload != "none":
        raise UserError(f"hardware.offload: {config.hardware.offload} parks the text encoders on the CPU, but they "
                        f"train here ({key}); set hardware.offload: none")  # fmt: skip


def trained_text_encoders(bb: Any, key: str) -> dict[str, torch.nn.Module]:
    """The CLIP text encoders that train (`key` says which setting asked), marked so that encode_prompts keeps
    their gradients."""
    names = text_encoder_names(bb.pipe.__class__, bb.spec)
    if not names:
        raise UserError(f"{key}: {bb.spec.pipeline} LoRA files carry no text encoder (diffusers reads the denoiser "
                        "only), so diffbase trains none for it; set it to false")  # fmt: skip
    bb.adapters["text_encoder_trains"] = names
    return {name: getattr(bb.pipe, name) for name in names}


def text_encoder_groups(config: Config, denoiser: list[Any], encoders: dict[str, torch.nn.Module]) -> list[dict]:
    """Two optimizer groups: the denoiser's parameters at training.learning_rate, the text encoders' at
    training.lora.text_encoder_lr (when set)."""
    lr = config.training.lora.text_encoder_lr
    text = {"params": [p for e in encoders.values() for p in trainable(e)]}
    return [{"params": denoiser}, text | ({"lr": lr} if lr is not None else {})]


def add_text_encoder_lora(bb: Any, cfg: LoraConfig) -> dict[str, torch.nn.Module]:
    """A plain LoRA on each CLIP text encoder's attention (rank and alpha as the denoiser's)."""
    import peft

    encoders = trained_text_encoders(bb, "training.lora.train_text_encoder")
    for encoder in encoders.values():
        targets = lora_target_names(encoder, list(TEXT_TARGETS), "training.lora.train_text_encoder")
        encoder.add_adapter(peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                            init_lora_weights="gaussian", target_modules=targets))  # fmt: skip
    return encoders


def lora_state_dict(trained: Trained, full: dict[str, Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Only the adapter layers of each module with adapters (`full`: the gathered state dicts of sharded modules);
    a method's other modules (DreamO's embeddings) are its own to save."""
    from peft.utils import get_peft_model_state_dict

    return {
        name: {k: v.detach() for k, v in get_peft_model_state_dict(module, state_dict=(full or {}).get(name)).items()}
        for name, module in trained.modules.items()
        if hasattr(module, "peft_config")
    }


def load_lora_state_dict(trained: Trained, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    from peft.utils import set_peft_model_state_dict

    for name, module in trained.modules.items():
        if not hasattr(module, "peft_config"):
            continue
        result = set_peft_model_state_dict(module, tensors[name])
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"checkpoint: unexpected LoRA keys for {name}: {result.unexpected_keys[:3]}")


def prepare(bb: Any, config: Config, cfg: LoraConfig | None = None) -> Trained:
    """`cfg`: the LoRA settings when a method changes them (DreamBooth's train_text_encoder); else training.lora."""
    cfg = cfg or config.training.lora
    text_to_image.freeze(bb)
    add_lora(bb.denoiser, bb.family, cfg)
    if cfg.init_from:
        from diffbase.methods.lora_init import init_from

        init_from(bb, cfg, Path(cfg.init_from))
    modules: dict[str, torch.nn.Module] = {"denoiser": bb.denoiser}
    groups = None
    if cfg.train_text_encoder:
        encoders = add_text_encoder_lora(bb, cfg)
        modules.update(encoders)
        groups = text_encoder_groups(config, trainable(bb.denoiser), encoders)
    params = [p for m in modules.values() for p in trainable(m)]
    return Trained(modules, params, lora_state_dict, load_lora_state_dict, param_groups=groups)


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def export(config: Config, bb: Any, trained: Trained, out_dir: Path) -> dict[str, str]:
    """The adapter as users load it, written from CPU copies: LoRA and rsLoRA as diffusers and kohya/ComfyUI files;
    DoRA as a diffusers file (ComfyUI's DoRA normalises over the other axis, so a kohya file would differ);
    LoKr and LoHa as a LyCORIS file (diffusers loads none)."""
    from peft.utils import get_peft_model_state_dict

    from diffbase.models.lora_formats import peft_scales, save_diffusers_lora, save_lora, to_lycoris
    from diffbase.models.placement import cpu_state

    spec, denoiser, folder, kind = bb.spec, bb.denoiser, out_dir / "lora", config.training.lora.type
    if kind in LYCORIS_TYPES:
        state = cpu_state({f"{spec.denoiser}.{k}": v for k, v in get_peft_model_state_dict(denoiser).items()})
        lycoris = to_lycoris(state, peft_scales(denoiser, spec.denoiser), spec.denoiser == "unet")
        return {"lycoris": str(save_lora(lycoris, folder / "lora_lycoris.safetensors"))}
    encoders = {name: m for name, m in trained.modules.items() if name != "denoiser"}
    files = {"diffusers": str(save_diffusers_lora(bb.pipe.__class__, folder, spec.denoiser, denoiser, encoders))}
    if kind != "dora":
        files["kohya"] = str(save_lora(kohya_state(bb, encoders), folder / "lora_kohya.safetensors"))
    return files


def kohya_state(bb: Any, encoders: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The LoRA in kohya/ComfyUI names; text encoders as `lora_te_` (SD1.5) or `lora_te1_` / `lora_te2_`."""
    from peft.utils import get_peft_model_state_dict

    from diffbase.models.lora_formats import peft_scales, text_encoder_kohya, to_kohya
    from diffbase.models.lora_loading import linear_widths
    from diffbase.models.placement import cpu_state

    spec, denoiser = bb.spec, bb.denoiser
    state = cpu_state({f"{spec.denoiser}.{k}": v for k, v in get_peft_model_state_dict(denoiser).items()})
    out = to_kohya(state, peft_scales(denoiser, spec.denoiser), spec.family, linear_widths(denoiser, spec.denoiser))
    for name, encoder in encoders.items():
        prefix = "lora_te" if len(spec.text_encoders) == 1 else f"lora_te{1 if name == 'text_encoder' else 2}"
        layers = cpu_state({f"{name}.{k}": v for k, v in get_peft_model_state_dict(encoder).items()})
        out.update(text_encoder_kohya(layers, peft_scales(encoder, name), prefix))
    return out


LORA = register(
    Method(
        name="lora",
        prepare=prepare,
        loss=text_to_image.loss,
        export=export,
        dataset=text_to_image.dataset,
        validate=text_to_image.validate,
        metrics=text_to_image.METRICS,
        section=("lora", LoraConfig),
        load=text_to_image.load,
        run=text_to_image.run,
        describe="LoRA on the denoiser",
        check=check,
    )
)

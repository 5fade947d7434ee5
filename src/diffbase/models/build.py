"""Build a backbone's components from a ModelConfig, with random weights.

Used for tiny models (tests, `zoo tiny`) and for full-size structures with random weights
(GPU benchmarks). Real weights come from `models.loading` instead.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from diffbase.config import ModelConfig
from diffbase.errors import UserError, closest
from diffbase.models.specs import FamilySpec, TextEncoderSpec, spec_for
from diffbase.models.tokenizers import SYNTHETIC_WORDS, tiny_tokenizer
from diffbase.runtime import torch_dtype


def _class(library: str, name: str) -> type:
    import diffusers
    import transformers

    return getattr({"diffusers": diffusers, "transformers": transformers}[library], name)


def check_kwargs(cls: type, kwargs: dict[str, Any], dotted: str) -> None:
    """Unknown constructor keys in a component's config are a one-line error with a hint."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in kwargs:
        if key not in params:
            raise UserError(f"{dotted}.{key}: not an argument of {cls.__name__}{closest(key, params)}")


def _tokenizer_ids(kind: str, tok: Any) -> dict[str, Any]:
    """Config values that must agree with the locally built tokenizer."""
    ids = {"vocab_size": len(tok)}
    if kind == "clip":
        ids |= {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    elif kind == "t5":
        ids |= {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "decoder_start_token_id": 0}
    elif kind in ("qwen", "mistral"):
        ids |= {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
        if tok.bos_token_id is not None:
            ids["bos_token_id"] = tok.bos_token_id
    return ids


def build_text_encoder(
    te: TextEncoderSpec,
    kwargs: dict[str, Any],
    tiny_tokenizers: bool,
    words: list[str] | None = None,
    max_length: int | None = None,
) -> tuple[Any, Any]:
    """One text encoder with random weights, and its tiny tokenizer when asked for."""
    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
    tok = tiny_tokenizer(te.tokenizer_kind, max_length or te.max_length, words) if tiny_tokenizers else None
    if tok is not None:
        ids = _tokenizer_ids(te.tokenizer_kind, tok)
        if "text_config" in kwargs:  # multimodal config (Mistral3): ids live on the text model
            kwargs["text_config"].update(ids)
            kwargs.update({k: v for k, v in ids.items() if k != "vocab_size"})
        else:
            kwargs.update(ids)
    config = _class("transformers", te.config_class)(**kwargs)
    model = _class("transformers", te.model_class)(config)
    return model.eval(), tok


def build_components(
    cfg: ModelConfig, *, text: bool = True, tiny_tokenizers: bool = True, seed: int = 0
) -> dict[str, Any]:
    """All pipeline components of `cfg` with random weights (seeded), keyed as the pipeline names them."""
    spec = spec_for(cfg.family, cfg.variant)
    torch.manual_seed(seed)
    dtype = torch_dtype(cfg.dtype)
    components: dict[str, Any] = {}
    denoiser_kwargs = getattr(cfg, spec.denoiser)
    if denoiser_kwargs is None:
        raise UserError(f"model.{spec.denoiser}: required for family {cfg.family}")
    for name, library, cls_name, kwargs in (
        (spec.denoiser, "diffusers", spec.denoiser_class, denoiser_kwargs),
        ("vae", "diffusers", spec.vae_class, cfg.vae),
        ("scheduler", "diffusers", spec.scheduler_class, cfg.scheduler),
    ):
        cls = _class(library, cls_name)
        check_kwargs(cls, kwargs, f"model.{name}")
        if name == "scheduler":  # schedulers hold CPU tensors, also when modules are built on meta
            with torch.device("cpu"):
                components[name] = cls(**kwargs)
        else:  # each in its dtype as soon as it exists: a full FLUX.1 held in fp32 at once would need 68 GB
            components[name] = cls(**kwargs).to(dtype)
    for module in (components[spec.denoiser], components["vae"]):
        module.eval()
    if text:
        for te in spec.text_encoders:
            kwargs = cfg.text_encoders.get(te.key)
            if kwargs is None:
                raise UserError(f"model.text_encoders.{te.key}: required for {spec.name}")
            words = SYNTHETIC_WORDS if cfg.word_tokenizer else None
            length = cfg.text_max_length if te.tokenizer_kind == "t5" else None
            encoder, components[te.tokenizer] = build_text_encoder(te, kwargs, tiny_tokenizers, words, length)
            components[te.component] = encoder.to(dtype)
    return components


def tokenizers(cfg: ModelConfig) -> dict[str, Any]:
    """The family's tiny tokenizers alone, for a model built without them at full size on the meta device (their
    few ids fit any vocabulary; building them with the encoders would size the vocabularies to theirs)."""
    spec = spec_for(cfg.family, cfg.variant)
    words = SYNTHETIC_WORDS if cfg.word_tokenizer else None
    return {te.tokenizer: tiny_tokenizer(te.tokenizer_kind, (cfg.text_max_length if te.tokenizer_kind == "t5" else None)
                                         or te.max_length, words) for te in spec.text_encoders}  # fmt: skip


def assemble_pipeline(spec: FamilySpec, components: dict[str, Any], extras: dict[str, Any] | None = None) -> Any:
    """A diffusers pipeline from components, with the family's non-module arguments."""
    kwargs = dict(spec.pipeline_extras) | (extras or {}) | components
    cls = _class("diffusers", spec.pipeline)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def build_pipeline(cfg: ModelConfig, seed: int = 0) -> Any:
    spec = spec_for(cfg.family, cfg.variant)
    return assemble_pipeline(spec, build_components(cfg, seed=seed), cfg.pipeline)

"""The table of backbone families: which diffusers and transformers classes make each one.

Like BFL's `util.py`, this is data, not behaviour: builders and loaders read it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from diffbase.errors import UserError, closest


@dataclass(frozen=True)
class TextEncoderSpec:
    component: str  # pipeline attribute: text_encoder, text_encoder_2, ...
    tokenizer: str  # pipeline attribute of its tokenizer
    key: str  # key under `model.text_encoders` in the YAML config
    tokenizer_kind: str  # which tiny tokenizer stands in for it (models.tokenizers)
    config_class: str  # transformers config class
    model_class: str  # transformers model class
    max_length: int


@dataclass(frozen=True)
class FamilySpec:
    name: str  # family.variant-group name, e.g. "flux2-klein"
    family: str  # config `model.family`
    pipeline: str  # diffusers pipeline class
    denoiser: str  # "unet" or "transformer"
    denoiser_class: str
    vae_class: str
    scheduler_class: str
    text_encoders: tuple[TextEncoderSpec, ...]
    prediction: str  # training target: "epsilon" or "flow"
    variants: tuple[str, ...]
    # Extra pipeline constructor arguments that are not modules.
    pipeline_extras: tuple[tuple[str, object], ...] = ()


CLIP_L = TextEncoderSpec("text_encoder", "tokenizer", "clip_l", "clip", "CLIPTextConfig", "CLIPTextModel", 77)
CLIP_G = TextEncoderSpec(
    "text_encoder_2", "tokenizer_2", "clip_g", "clip", "CLIPTextConfig", "CLIPTextModelWithProjection", 77
)
FLUX1_TEXT = (CLIP_L, TextEncoderSpec("text_encoder_2", "tokenizer_2", "t5", "t5", "T5Config", "T5EncoderModel", 512))
QWEN3 = TextEncoderSpec("text_encoder", "tokenizer", "qwen3", "qwen", "Qwen3Config", "Qwen3ForCausalLM", 512)

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="sd15",
            family="sd15",
            pipeline="StableDiffusionPipeline",
            denoiser="unet",
            denoiser_class="UNet2DConditionModel",
            vae_class="AutoencoderKL",
            scheduler_class="PNDMScheduler",
            text_encoders=(CLIP_L,),
            prediction="epsilon",
            variants=("base", "tiny", "toy"),
            pipeline_extras=(("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False)),
        ),
        FamilySpec(
            name="sdxl",
            family="sdxl",
            pipeline="StableDiffusionXLPipeline",
            denoiser="unet",
            denoiser_class="UNet2DConditionModel",
            vae_class="AutoencoderKL",
            scheduler_class="EulerDiscreteScheduler",
            text_encoders=(
                CLIP_L,
                CLIP_G,
            ),
            prediction="epsilon",
            variants=("base", "tiny"),
            pipeline_extras=(("image_encoder", None), ("feature_extractor", None)),
        ),
        FamilySpec(
            name="sd3",
            family="sd3",
            pipeline="StableDiffusion3Pipeline",
            denoiser="transformer",
            denoiser_class="SD3Transformer2DModel",
            vae_class="AutoencoderKL",
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            text_encoders=(
                TextEncoderSpec(
                    "text_encoder", "tokenizer", "clip_l", "clip", "CLIPTextConfig", "CLIPTextModelWithProjection", 77
                ),
                CLIP_G,
                TextEncoderSpec("text_encoder_3", "tokenizer_3", "t5", "t5", "T5Config", "T5EncoderModel", 256),
            ),
            prediction="flow",
            variants=("large", "medium", "tiny"),
            pipeline_extras=(("image_encoder", None), ("feature_extractor", None)),
        ),
        FamilySpec(
            name="flux1",
            family="flux1",
            pipeline="FluxPipeline",
            denoiser="transformer",
            denoiser_class="FluxTransformer2DModel",
            vae_class="AutoencoderKL",
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            text_encoders=FLUX1_TEXT,
            prediction="flow",
            variants=("dev", "schnell", "tiny", "tiny-schnell", "toy"),
            pipeline_extras=(("image_encoder", None), ("feature_extractor", None)),
        ),
        FamilySpec(
            name="flux2",
            family="flux2",
            pipeline="Flux2Pipeline",
            denoiser="transformer",
            denoiser_class="Flux2Transformer2DModel",
            vae_class="AutoencoderKLFlux2",
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            text_encoders=(
                TextEncoderSpec(
                    "text_encoder",
                    "tokenizer",
                    "mistral3",
                    "mistral",
                    "Mistral3Config",
                    "Mistral3ForConditionalGeneration",
                    512,
                ),
            ),
            prediction="flow",
            variants=("dev", "tiny"),
        ),
        FamilySpec(
            name="flux2-klein",
            family="flux2",
            pipeline="Flux2KleinPipeline",
            denoiser="transformer",
            denoiser_class="Flux2Transformer2DModel",
            vae_class="AutoencoderKLFlux2",
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            text_encoders=(QWEN3,),
            prediction="flow",
            variants=("klein-4b", "klein-9b", "tiny-klein"),
        ),
    )
}

# The pipelines the editing and inpainting methods need: the same components, other pipeline classes.
_EDITING = (
    ("flux1", "flux1-kontext", "FluxKontextPipeline", ("kontext-dev", "tiny-kontext"), None),
    ("flux1", "flux1-fill", "FluxFillPipeline", ("fill-dev", "tiny-fill"), ()),
    (
        "flux2-klein",
        "flux2-klein-inpaint",
        "Flux2KleinInpaintPipeline",
        ("klein-4b-inpaint", "tiny-klein-inpaint"),
        None,
    ),
)
for _base, _name, _pipeline, _variants, _extras in _EDITING:
    _row = replace(FAMILIES[_base], name=_name, pipeline=_pipeline, variants=_variants)
    FAMILIES[_name] = _row if _extras is None else replace(_row, pipeline_extras=_extras)

PIPELINE_TO_SPEC = {spec.pipeline: spec for spec in FAMILIES.values()}


def spec_for(family: str, variant: str = "") -> FamilySpec:
    """The spec for a config's `model.family` and `model.variant`."""
    matches = [s for s in FAMILIES.values() if s.family == family]
    if not matches:
        names = sorted({s.family for s in FAMILIES.values()})
        raise UserError(f"model.family: unknown family '{family}'{closest(family, names)}; expected one of {names}")
    for spec in matches:
        if variant in spec.variants:
            return spec
    if not variant and len(matches) >= 1:
        return matches[0]
    variants = [v for s in matches for v in s.variants]
    raise UserError(
        f"model.variant: '{variant}' is not a {family} variant{closest(variant, variants)}; expected one of {variants}"
    )


def spec_for_pipeline(class_name: str, where: str) -> FamilySpec:
    """The spec for a diffusers folder whose model_index.json names `class_name`."""
    if class_name not in PIPELINE_TO_SPEC:
        known = sorted(PIPELINE_TO_SPEC)
        raise UserError(f"{where}: pipeline '{class_name}' is not a supported family; expected one of {known}")
    return PIPELINE_TO_SPEC[class_name]

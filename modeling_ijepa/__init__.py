"""ijepa-hf: I-JEPA (Assran et al., CVPR 2023) for the Hugging Face ecosystem.

Importing this package registers its classes with the transformers Auto API. Our configuration keeps the built-in
`model_type="ijepa"` (so checkpoints stay loadable by vanilla transformers); the registration replaces, in this
process only, the built-in `"ijepa"` entries with this package's classes, which read and write the same weights.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_ijepa import IJepaConfig, configuration_dir, list_presets
from .modeling_ijepa import (
    IJepaForImageClassification,
    IJepaForPreTraining,
    IJepaForPreTrainingOutput,
    IJepaModel,
    IJepaPredictor,
    IJepaPreTrainedModel,
    gather_tokens,
    get_2d_sincos_pos_embed,
)


def _register_with_transformers() -> None:
    AutoConfig.register("ijepa", IJepaConfig, exist_ok=True)
    AutoModel.register(IJepaConfig, IJepaModel, exist_ok=True)
    AutoModelForPreTraining.register(IJepaConfig, IJepaForPreTraining, exist_ok=True)
    AutoModelForImageClassification.register(IJepaConfig, IJepaForImageClassification, exist_ok=True)
    # transformers renames the built-in IJepa's weights on load/save (its files keep the legacy ViT key names). Our
    # classes share those names, so they must opt in to the same renaming to read and write identical files.
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    register_checkpoint_conversion_mapping(
        "IJepaModel", get_checkpoint_conversion_mapping("IJepaModel"), overwrite=True
    )


_register_with_transformers()

__all__ = [
    "IJepaConfig",
    "IJepaModel",
    "IJepaPredictor",
    "IJepaPreTrainedModel",
    "IJepaForPreTraining",
    "IJepaForPreTrainingOutput",
    "IJepaForImageClassification",
    "configuration_dir",
    "list_presets",
    "gather_tokens",
    "get_2d_sincos_pos_embed",
]

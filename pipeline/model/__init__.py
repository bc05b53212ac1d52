"""The MAE model: a ViT encoder that sees only visible patches, a light decoder, a masked-patch loss.

Nothing here knows about ranks, devices or DeepSpeed: the training code wraps it.
"""

from pipeline.model.mae import MAE, build_mae, patchify, unpatchify
from pipeline.presets import PRESETS, Preset, resolve_preset
from pipeline.model.vit import Encoder

__all__ = ["MAE", "Encoder", "PRESETS", "Preset", "build_mae", "patchify", "resolve_preset", "unpatchify"]

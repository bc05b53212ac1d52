"""Named encoder/decoder shapes. base/large/huge are the MAE paper's (decoder 512-d, 8 blocks).

Plain data without torch, so the config can check a run against its preset (patch size, decoder
heads) before anything heavy is imported; pipeline.model builds from the same table.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    timm_name: str
    """The timm model whose weights our exported encoder loads into (at 224 px, 3 channels)."""


PRESETS: dict[str, Preset] = {
    "micro": Preset(128, 6, 4, 16, 128, 2, 4, ""),  # CPU-sized (small images, minutes of training); no timm twin
    "tiny": Preset(192, 12, 3, 16, 128, 4, 4, "vit_tiny_patch16_224"),
    "small": Preset(384, 12, 6, 16, 256, 4, 8, "vit_small_patch16_224"),
    "base": Preset(768, 12, 12, 16, 512, 8, 16, "vit_base_patch16_224"),
    "large": Preset(1024, 24, 16, 16, 512, 8, 16, "vit_large_patch16_224"),
    "huge": Preset(1280, 32, 16, 14, 512, 8, 16, "vit_huge_patch14_224"),
}


def resolve_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"model.preset={name!r}: accepted values are {', '.join(PRESETS)}") from None

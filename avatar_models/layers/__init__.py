"""Shared building blocks of the video DiTs: embeddings, attention, adaLN-Zero blocks, packing."""

from avatar_models.layers.attention import Attention
from avatar_models.layers.dit_block import DiTBlock, FinalLayer, Mlp
from avatar_models.layers.embeddings import (
    PatchEmbed,
    TimestepEmbedder,
    sincos_1d,
    sincos_2d,
    temporal_sincos,
    unpatchify,
)
from avatar_models.layers.packing import AnchorPacking

__all__ = ["Attention", "AnchorPacking", "DiTBlock", "FinalLayer", "Mlp", "PatchEmbed",
           "TimestepEmbedder", "sincos_1d", "sincos_2d", "temporal_sincos", "unpatchify"]

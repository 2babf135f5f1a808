"""Weight initialisations shared by the models."""

from __future__ import annotations

from torch import nn


def vit_init(module: nn.Module) -> None:
    """ViT init of every submodule: xavier-uniform linears with zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

"""Argument checks, local-folder checks and the encoder-wrapper base shared by the conditioning,
media and data modules.

Every failure names the argument (or path), what was expected and what was received.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ENV_HOME = "AVATAR_MODELS_HOME"


def as_tensor(name: str, value: object) -> torch.Tensor:
    """Tensor view of a torch.Tensor or numpy array (no copy where possible)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def check_rank(name: str, value: torch.Tensor, ranks: int | Sequence[int], layout: str) -> None:
    allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if value.dim() not in allowed:
        raise ValueError(f"{name} must be {layout}, got shape {list(value.shape)}")


def check_dim(name: str, value: torch.Tensor, dim: int, size: int, layout: str) -> None:
    if value.shape[dim] != size:
        raise ValueError(f"{name} must be {layout} with {size} at dim {dim}, got shape "
                         f"{list(value.shape)}")


def check_dtype(name: str, value: torch.Tensor, *, uint8: bool = False) -> None:
    if uint8 and value.dtype != torch.uint8:
        got = str(value.dtype).removeprefix("torch.")
        raise TypeError(f"{name} must have dtype uint8, got {got}")
    if not uint8 and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{str(value.dtype).removeprefix('torch.')}")


def check_positive(name: str, value: float, *, integer: bool = False) -> None:
    if integer and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def resolve_model_dir(path: str | os.PathLike | None, component: str, expected: str,
                      required: Sequence[str] = ("config.json",),
                      weights_suffix: str = ".safetensors", subfolder: str | None = None) -> Path:
    """Check that a local model folder exists and holds what the loader needs.

    ``path=None`` means ``$AVATAR_MODELS_HOME/<component>``; ``subfolder`` is appended. Raises
    FileNotFoundError naming the path and the model expected there; nothing is ever downloaded.
    """
    if path is None:
        home = os.environ.get(ENV_HOME)
        if not home:
            raise FileNotFoundError(f"no path given for the {component} model and ${ENV_HOME} is "
                                    f"not set; pass a local folder with {expected}")
        path = Path(home) / component
    path = Path(path).expanduser()
    if subfolder:
        path = path / subfolder
    if not path.is_dir():
        raise FileNotFoundError(f"{component} model folder not found: {str(path)!r}; expected "
                                f"{expected}")
    for name in required:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{str(path / name)!r} is missing; {component} folder "
                                    f"{str(path)!r} must hold {expected}")
    if not any(p.name.endswith(weights_suffix) for p in path.iterdir()):
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(f"no {weights_suffix} weights in {str(path)!r} (found {found}); "
                                f"expected {expected}. Re-save with save_pretrained(..., "
                                f"safe_serialization=True) on a machine that has the model")
    return path


def check_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {str(path)!r}")
    return path


class FrozenModelWrapper:
    """Base of the encoder wrappers: each holds a frozen ``self.model`` (an nn.Module) and reports
    where and in which dtype it runs."""

    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

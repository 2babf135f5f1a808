"""CLIP image and text embeddings (transformers ``CLIPModel``) and embedding mixing for editing.

Anchored Diffusion uses the CLIP embedding of the source image as its global signal; a text
embedding in its place gives text-to-video, and a mix of the two gives semantic editing
(seeds/000, sec. 4.4). MCDM uses CLIP image tokens. The paper does not give the mixing formula;
:func:`mix_embeddings` (spherical / linear interpolation) and :func:`edit_embedding` (a text
direction added to the image embedding) are the two usual choices.

Images in: uint8 ``[N, H, W, 3]`` (file convention) or float ``[N, 3, H, W]`` in ``[-1, 1]``
(model convention); a single image without N is accepted. Preprocessing is done here in torch
(bicubic resize of the short side, centre crop, CLIP mean/std), so no image processor is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPModel

from avatar_models.conditioning._checks import (
    FrozenModelWrapper,
    as_tensor,
    check_dim,
    check_dtype,
    check_rank,
    resolve_model_dir,
)

EXPECTED = ("a transformers CLIPModel folder (config.json + model.safetensors, plus the tokenizer "
            "files for text, e.g. openai/clip-vit-large-patch14 saved with save_pretrained)")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPEncoder(FrozenModelWrapper):
    """Frozen CLIP: ``encode_images``, ``image_tokens``, ``encode_text``.

    Args:
        model: a ``CLIPModel``.
        tokenizer: optional tokenizer for ``encode_text(texts)``; without one, pass input_ids.
        image_mean, image_std: normalisation (default: OpenAI CLIP's).
    """

    def __init__(self, model: CLIPModel, tokenizer=None, *,
                 image_mean: Sequence[float] = OPENAI_MEAN,
                 image_std: Sequence[float] = OPENAI_STD):
        if not isinstance(model, CLIPModel):
            raise TypeError(f"model must be a transformers CLIPModel, got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.embed_dim = int(model.config.projection_dim)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self._mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None, *, subfolder: str | None = None,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> CLIPEncoder:
        """Load model (and tokenizer / preprocessor_config.json mean and std when present) from a
        local folder; ``path=None`` reads ``$AVATAR_MODELS_HOME/clip``."""
        folder = resolve_model_dir(path, "clip", EXPECTED, subfolder=subfolder)
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        tokenizer = None
        if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        mean, std = OPENAI_MEAN, OPENAI_STD
        pre = Path(folder) / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        return cls(model.to(device, dtype), tokenizer, image_mean=mean, image_std=std)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (see module doc) -> normalised pixel values float ``[N, 3, S, S]``,
        S = ``image_size``, on the model's device and dtype."""
        x = as_tensor("images", images)
        if x.dtype == torch.uint8:
            layout = "uint8 [N, H, W, 3] or [H, W, 3]"
            check_rank("images", x, (3, 4), layout)
            check_dim("images", x, -1, 3, layout)
            x = x.movedim(-1, -3).float() / 255.0
        else:
            layout = "float [N, 3, H, W] or [3, H, W] in [-1, 1]"
            check_dtype("images", x)
            check_rank("images", x, (3, 4), layout)
            check_dim("images", x, -3, 3, layout)
            x = (x.float() + 1) / 2
        x = (x[None] if x.dim() == 3 else x).to(self.device)
        s = self.image_size
        h, w = x.shape[-2:]
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[..., top:top + s, left:left + s]
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x.to(self.dtype)

    def encode_images(self, images: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Projected image embeddings float ``[N, D]`` (unit norm unless ``normalize=False``)."""
        pooled = self.model.vision_model(pixel_values=self.preprocess(images)).pooler_output
        emb = self.model.visual_projection(pooled)
        return F.normalize(emb, dim=-1) if normalize else emb

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Vision-transformer tokens ``[N, 1 + P, D_vision]`` (class token first), e.g. MCDM's
        image tokens."""
        return self.model.vision_model(pixel_values=self.preprocess(images)).last_hidden_state

    def tokenize(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` int64 ``[N, L]``, padded/truncated to the model's
        context length."""
        if self.tokenizer is None:
            raise ValueError("this CLIPEncoder has no tokenizer (the model folder had no "
                             "tokenizer.json / vocab.json); pass input_ids to encode_text")
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def encode_text(self, texts: str | Sequence[str] | None = None, *,
                    input_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """Projected text embeddings float ``[N, D]`` from strings or token ids ``[N, L]``."""
        if (texts is None) == (input_ids is None):
            raise ValueError("pass exactly one of texts or input_ids")
        if texts is not None:
            input_ids, attention_mask = self.tokenize(texts)
        ids = as_tensor("input_ids", input_ids)
        check_rank("input_ids", ids, 2, "[N, L]")
        if ids.is_floating_point():
            raise TypeError(f"input_ids must be an integer tensor, got {ids.dtype}")
        mask = None if attention_mask is None else attention_mask.to(self.device)
        out = self.model.text_model(input_ids=ids.to(self.device), attention_mask=mask)
        emb = self.model.text_projection(out.pooler_output)
        return F.normalize(emb, dim=-1) if normalize else emb


def _unit(name: str, x: torch.Tensor) -> torch.Tensor:
    x = as_tensor(name, x)
    check_dtype(name, x)
    check_rank(name, x, (1, 2), "[N, D] or [D]")
    return F.normalize(x.float(), dim=-1)


def mix_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, weight: float = 0.5, *,
                   mode: Literal["slerp", "lerp"] = "slerp") -> torch.Tensor:
    """Blend image and text embeddings for editing / text-conditioned generation.

    ``weight`` 0 gives the image embedding, 1 the text embedding. ``"slerp"`` follows the great
    circle between the two unit vectors (the embeddings live on the unit sphere); ``"lerp"``
    averages and renormalises. Inputs ``[N, D]`` or ``[D]`` broadcast against each other.

    Returns:
        float32 unit vectors, broadcast shape of the inputs.
    """
    a, b = _unit("image_emb", image_emb), _unit("text_emb", text_emb)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"text_emb must have D={a.shape[-1]} like image_emb, got {b.shape[-1]}")
    w = float(weight)
    if mode == "lerp":
        return F.normalize((1 - w) * a + w * b, dim=-1)
    if mode != "slerp":
        raise ValueError(f"mode must be 'slerp' or 'lerp', got {mode!r}")
    a, b = torch.broadcast_tensors(a, b)
    cos = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    near = sin < 1e-4  # almost parallel: slerp == lerp
    safe = torch.where(near, torch.ones_like(sin), sin)
    out = (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / safe
    out = torch.where(near, (1 - w) * a + w * b, out)
    return F.normalize(out, dim=-1)


def edit_embedding(image_emb: torch.Tensor, source_text_emb: torch.Tensor,
                   target_text_emb: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Move an image embedding along a text direction:
    ``normalize(image + strength * (target_text - source_text))``, e.g. source "a photo of a
    woman", target "a photo of a woman with glasses". Returns float32 unit vectors."""
    a = _unit("image_emb", image_emb)
    s, t = _unit("source_text_emb", source_text_emb), _unit("target_text_emb", target_text_emb)
    for name, v in (("source_text_emb", s), ("target_text_emb", t)):
        if v.shape[-1] != a.shape[-1]:
            raise ValueError(f"{name} must have D={a.shape[-1]} like image_emb, got {v.shape[-1]}")
    return F.normalize(a + float(strength) * (t - s), dim=-1)

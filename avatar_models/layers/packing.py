"""Anchor token packing: the anchor frame's tokens exist once per batch, not once per sequence.

A batch of B sequences of T frames, P tokens each, whose frame ``anchor_frames[b]`` is the same
(anchor) frame in every sequence: Eq. 3 of Anchored Diffusion overrides the anchor tokens of every
sequence ``b != source`` with those of ``source`` in every layer. Those rows are pure copies, so
computing their projections, MLPs or attention queries is wasted work. The packed layout keeps each
frame once:

- packed frames ``F = B*T - (B-1)``: every frame of every sequence except the anchor frame of
  sequences ``b != source`` (b-major, time order kept); packed tokens ``M = F*P``, frame-major,
  so per-frame adaLN modulation of the packed tensor ``[1, M, C]`` with ``[1, F, C]`` is exact;
- ``pack_*`` gathers the kept rows (O(tokens) indices, no arithmetic);
- ``unpack_*`` gathers them back to ``[B, T*P, ...]``; the anchor rows of every ``b != source``
  read the source's packed rows, i.e. they ARE the override of Eq. 3.

Attention is the one place that needs the full ``[B, N]`` layout (each sequence attends over its
own T*P tokens, the anchor included). There the unpacked K/V already hold the source's anchor rows,
and ``kernels.attention3d(..., anchor=packing.anchor)`` states the redirection explicitly, so an
implementation may skip the anchor query rows of ``b != source`` (their outputs are copies of the
source's and are dropped again by ``pack_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AnchorPacking:
    """Index maps between the full ``[B, T, P]`` layout and the packed one (see module doc)."""

    batch: int
    frames: int
    tokens_per_frame: int
    anchor_frames: torch.Tensor  # [B] long: index of the anchor frame inside each sequence
    source: int
    anchor_starts: tuple[int, ...]  # first token of the anchor frame per sequence (host ints)
    frame_pack: torch.Tensor     # [F] flat frame index b*T + t of each packed frame
    frame_unpack: torch.Tensor   # [B*T] packed frame holding each full frame (anchor -> source)
    token_pack: torch.Tensor     # [M] flat token index of each packed token
    token_unpack: torch.Tensor   # [B*N] packed token holding each full token

    @classmethod
    def build(cls, anchor_frames: torch.Tensor | list[int], frames: int, tokens_per_frame: int,
              source: int = 0, device: torch.device | str | None = None) -> AnchorPacking:
        anchor = torch.as_tensor(anchor_frames, dtype=torch.long, device=device)
        if anchor.dim() != 1:
            raise ValueError(f"anchor_frames must be 1-D [B], got shape {list(anchor.shape)}")
        batch = anchor.shape[0]
        if not 0 <= source < batch:
            raise ValueError(f"source must be in [0, {batch}), got {source}")
        if bool(((anchor < 0) | (anchor >= frames)).any()):
            raise ValueError(f"anchor_frames must lie in [0, T={frames}), got {anchor.tolist()}")
        flat = torch.arange(batch * frames, device=anchor.device).view(batch, frames)
        seq = torch.arange(batch, device=anchor.device)
        dropped = torch.zeros(batch, frames, dtype=torch.bool, device=anchor.device)
        dropped[seq, anchor] = seq != source                       # anchor rows of b != source
        frame_pack = flat[~dropped]                                # [F]
        frame_unpack = torch.cumsum(~dropped.flatten(), 0) - 1     # [B*T] packed slot if kept
        src_slot = frame_unpack[source * frames + anchor[source]]
        frame_unpack = torch.where(dropped.flatten(), src_slot, frame_unpack)
        p = torch.arange(tokens_per_frame, device=anchor.device)
        token_pack = (frame_pack[:, None] * tokens_per_frame + p).flatten()      # [M]
        token_unpack = (frame_unpack[:, None] * tokens_per_frame + p).flatten()  # [B*N]
        starts = tuple(int(a) * tokens_per_frame for a in anchor.tolist())
        return cls(batch, frames, tokens_per_frame, anchor, source, starts, frame_pack,
                   frame_unpack, token_pack, token_unpack)

    @property
    def packed_frames(self) -> int:
        return self.frame_pack.shape[0]

    @property
    def anchor(self):
        """The matching ``kernels.Anchor`` in token units over each sequence's T*P tokens."""
        import kernels

        return kernels.Anchor(list(self.anchor_starts), self.tokens_per_frame, source=self.source)

    def pack_frames(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [F, ...]."""
        return x.flatten(0, 1).index_select(0, self.frame_pack)

    def unpack_frames(self, x: torch.Tensor) -> torch.Tensor:
        """[F, ...] -> [B, T, ...] (anchor of every sequence = the source's)."""
        return x.index_select(0, self.frame_unpack).unflatten(0, (self.batch, self.frames))

    def pack_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] -> [1, M, ...]."""
        return x.flatten(0, 1).index_select(0, self.token_pack).unsqueeze(0)

    def unpack_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[1, M, ...] -> [B, N, ...] (anchor rows of every sequence = the source's)."""
        n = self.frames * self.tokens_per_frame
        return x[0].index_select(0, self.token_unpack).unflatten(0, (self.batch, n))

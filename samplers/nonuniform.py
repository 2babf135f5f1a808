"""Non-uniform sequences with a shared anchor (Anchored Diffusion, Eq. 1) and the reorder step.

From a driving video of N frames and a segment length T: the anchor is the central frame
(``N // 2``); the other N-1 frames are split into B = ceil((N-1)/(T-1)) groups, each sorted in
time, and the anchor is placed in the same slot of every sequence (default ``T // 2``), the
group's frames filling the other slots in order around it. This is the paper's Eq. 1 (the anchor
in one common column), so after the override of Eq. 3 the anchor tokens that sequence b receives
from sequence 0 carry the temporal position of the slot they land in (the first version sorted
the anchor into each sequence, so its slot varied per sequence). ``random`` groups are a random
partition; ``strided`` groups take every B-th frame (group b = frames b, b+B, b+2B, ... of the
non-anchor frames), so every sequence spans the whole video. When T-1 does not divide N-1 (or
N < T), short groups are padded with frames owned by other groups; ``owner`` marks the one
occurrence of each driving frame that the output uses (the anchor: sequence 0's), so
:func:`reorder` yields every frame exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("random", "strided")


@dataclass(frozen=True)
class SequencePlan:
    indices: torch.Tensor     # [B, T] long: driving-frame index of each slot (the non-anchor
    #                           slots sorted in time)
    anchor_pos: torch.Tensor  # [B] long: slot of the anchor frame, the same in every sequence
    owner: torch.Tensor       # [B, T] bool: the occurrence that reorder() keeps
    anchor: int               # driving-frame index of the anchor
    num_frames: int           # N

    @property
    def batch(self) -> int:
        return self.indices.shape[0]

    @property
    def frames(self) -> int:
        return self.indices.shape[1]


def nonuniform_plan(num_frames: int, frames_per_sequence: int, *, mode: str = "random",
                    anchor: int | None = None, anchor_slot: int | None = None,
                    generator: torch.Generator | None = None) -> SequencePlan:
    """Sequences of ``frames_per_sequence`` frames sharing ``anchor`` (default: the central frame)
    in slot ``anchor_slot`` of every sequence (default: T // 2) that together cover all
    ``num_frames`` frames (see the module docstring)."""
    n, t = num_frames, frames_per_sequence
    if n < 1 or t < 2:
        raise ValueError(f"need num_frames >= 1 and frames_per_sequence >= 2, got "
                         f"num_frames={n}, frames_per_sequence={t}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    anchor = n // 2 if anchor is None else anchor
    if not 0 <= anchor < n:
        raise ValueError(f"anchor must be in [0, {n}), got {anchor}")
    slot = t // 2 if anchor_slot is None else anchor_slot
    if not 0 <= slot < t:
        raise ValueError(f"anchor_slot must be in [0, {t}), got {anchor_slot}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    others = torch.tensor([i for i in range(n) if i != anchor], dtype=torch.long)
    per = t - 1
    groups_n = max(1, math.ceil(len(others) / per))
    if mode == "random":
        perm = others[torch.randperm(len(others), generator=gen)]
        groups = [perm[g * per:(g + 1) * per] for g in range(groups_n)]
    else:
        groups = [others[g::groups_n] for g in range(groups_n)]
    rows, owners = [], []
    for g in groups:
        pad = per - len(g)
        pool = others[~torch.isin(others, g)] if len(others) else torch.tensor([anchor])
        if len(pool) == 0:
            pool = others
        extra = pool[torch.randint(len(pool), (pad,), generator=gen)] if pad > 0 else g[:0]
        idx = torch.cat([g, extra])
        own = torch.cat([torch.ones(len(g), dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
        order = torch.sort(idx * 2 + (~own).long(), stable=True).indices  # time, owner first
        idx, own = idx[order], own[order]
        rows.append(torch.cat([idx[:slot], torch.tensor([anchor]), idx[slot:]]))
        owners.append(torch.cat([own[:slot], torch.tensor([len(rows) == 1]), own[slot:]]))
    indices = torch.stack(rows)
    owner = torch.stack(owners)
    anchor_pos = torch.full((len(rows),), slot, dtype=torch.long)
    return SequencePlan(indices, anchor_pos, owner, anchor, n)


def reorder(frames: torch.Tensor, plan: SequencePlan) -> torch.Tensor:
    """[B, T, ...] generated sequences -> [N, ...] chronological video, each frame once."""
    if tuple(frames.shape[:2]) != tuple(plan.indices.shape):
        raise ValueError(f"frames must be [B, T, ...] = {list(plan.indices.shape)} + [...], got "
                         f"{list(frames.shape)}")
    own = plan.owner.to(frames.device)
    idx = plan.indices.to(frames.device)[own]        # [N] driving index of each kept slot
    kept = frames[own]                               # [N, ...]
    return kept[torch.argsort(idx)]


def gather_frames(video: torch.Tensor, plan: SequencePlan) -> torch.Tensor:
    """[N, ...] per-driving-frame data (landmarks, ...) -> [B, T, ...] following the plan."""
    return video[plan.indices.to(video.device)]


def override_anchor(x: torch.Tensor, anchor_pos: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Eq. 3 on a [B, T, ...] tensor: every sequence's anchor slot := the source's (new tensor)."""
    b = x.shape[0]
    seq = torch.arange(b, device=x.device)
    pos = anchor_pos.to(x.device)
    out = x.clone()
    out[seq, pos] = x[source, pos[source]].unsqueeze(0).expand(b, *x.shape[2:])
    return out

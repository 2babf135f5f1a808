"""Metrics on hand-built inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from avatar_models.metrics import csim, expressive_lmse, lmse, min_pairwise_similarity, self_csim


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_csim_is_the_worst_frame():
    src = torch.tensor([2.0, 0.0])                                    # norm does not matter
    gen = torch.tensor([_unit(0), _unit(60), [0.0, 3.0], _unit(30)])  # 1, 0.5, 0, cos 30
    assert csim(src, gen) == pytest.approx(0.0, abs=1e-12)
    assert csim(src, gen[[0, 1, 3]]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"generated must have D=2"):
        csim(src, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"source must be a float \[D\] tensor"):
        csim(torch.ones(1, 2), gen)


def test_self_csim():
    gen = torch.tensor([_unit(0), _unit(20), _unit(90)])              # min pair: 0 vs 90 -> 0
    drv = torch.tensor([_unit(0), _unit(60), _unit(30)])              # min pair: 0 vs 60 -> 0.5
    assert min_pairwise_similarity(gen) == pytest.approx(0.0, abs=1e-12)
    assert min_pairwise_similarity(drv) == pytest.approx(0.5)
    assert self_csim(gen, drv) == pytest.approx(0.5)
    assert self_csim(drv, drv) == 0.0
    with pytest.raises(ValueError, match="at least 2 frames"):
        min_pairwise_similarity(torch.ones(1, 3))


def test_lmse_known_answer_and_nan_frames():
    drv = torch.zeros(3, 478, 3)
    gen = torch.zeros(3, 478, 3)
    gen[:, :, 0] = 0.1                                                # every x off by 0.1
    assert lmse(gen, drv) == pytest.approx(0.01 / 3)                  # mean over x, y, z
    gen[1] = float("nan")                                             # no face in frame 1
    assert lmse(gen, drv) == pytest.approx(0.01 / 3)
    gen2 = torch.zeros(2, 478, 3)
    gen2[:, 13, 1] = 0.3                                              # a lip point (index 13)
    gen2[:, 1, 1] = 5.0                                               # nose tip: not expressive
    from avatar_models.conditioning.face_regions import EXPRESSIVE_INDICES

    k = len(EXPRESSIVE_INDICES)
    assert expressive_lmse(gen2, torch.zeros(2, 478, 3)) == pytest.approx(0.09 / (3 * k))
    assert lmse(gen2, torch.zeros(2, 478, 3), [1]) == pytest.approx(25.0 / 3)
    assert math.isnan(lmse(torch.full((1, 5, 3), float("nan")), torch.zeros(1, 5, 3)))
    with pytest.raises(ValueError, match="must have the same shape"):
        lmse(torch.zeros(2, 478, 3), torch.zeros(3, 478, 3))
    with pytest.raises(ValueError, match=r"driving must be a \[N, K, 2\|3\] landmark tensor"):
        lmse(torch.zeros(2, 478, 3), torch.zeros(2, 478))

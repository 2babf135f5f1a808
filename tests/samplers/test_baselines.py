"""The long-video baselines beside Anchored Diffusion: independent windows (the floor) and
autoregressive chaining with frame replacement, on a toy denoiser that copies."""

from __future__ import annotations

import pytest
import torch

from samplers.autoregressive import autoregressive_sample, chained_windows
from samplers.multidiffusion import independent_windows, multidiffusion_sample
from samplers.schedules import make_scheduler


def copying_denoiser(scheduler):
    """Epsilon of a model that predicts every slot's clean frame as slot 0's current estimate
    (x_t / sqrt(alpha_bar)): it copies the window's first frame into the others."""
    ab = scheduler.alphas_cumprod

    def denoise(x, t, anchor_pos):
        a = ab[t].view(-1, 1, 1, 1, 1).to(x.dtype)
        x0 = (x[:, :1] / a.sqrt()).expand_as(x)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return denoise


def test_windows():
    assert independent_windows(8, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert independent_windows(9, 4)[-1].tolist() == [5, 6, 7, 8]
    assert chained_windows(8, 4, 2).tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]
    assert chained_windows(3, 4, 1).tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="context"):
        chained_windows(8, 4, 4)


def test_chaining_carries_content_and_independent_windows_do_not():
    n, t, shape = 13, 4, (2, 3, 3)
    sched = make_scheduler("ddim", None, 20)
    den = copying_denoiser(sched)
    windows = chained_windows(n, t, context=1)
    calls = []

    def window_denoiser(w):
        calls.append(w)
        return den

    chained = autoregressive_sample(window_denoiser, sched, windows, n, shape,
                                    generator=torch.Generator().manual_seed(0), progress=False)
    assert calls == list(range(windows.shape[0])) and chained.shape == (n, *shape)
    # window 0 invents frame 0; replacement hands it on, window after window
    spread = (chained - chained[0]).abs().amax()
    assert spread < 0.05 * chained[0].abs().amax()
    floor = multidiffusion_sample(den, sched, independent_windows(n, t), n, shape,
                                  generator=torch.Generator().manual_seed(0), progress=False)
    first = floor[[0, 4, 8]]  # first frames of three independent windows
    assert (first[0] - first[1]).abs().amax() > 0.3 and (first[1] - first[2]).abs().amax() > 0.3
    assert (floor[:4] - floor[0]).abs().amax() < 0.05 * floor[0].abs().amax()  # copy within


def test_replacement_keeps_known_frames_exactly():
    n, t, shape = 6, 4, (1, 2, 2)
    sched = make_scheduler("ddim", None, 5)
    seen = []

    def window_denoiser(w):
        def denoise(x, tt, anchor_pos):
            seen.append((w, x.clone()))
            return torch.zeros_like(x)  # epsilon 0: x0 = x_t / sqrt(alpha_bar)
        return denoise

    out = autoregressive_sample(window_denoiser, sched, chained_windows(n, t, 2), n, shape,
                                generator=torch.Generator().manual_seed(1), progress=False)
    # window 1 = frames 2..5: at its last step its slots 0, 1 hold frames 2, 3 noised to t_min
    last = [x for w, x in seen if w == 1][-1][0]
    ab = sched.alphas_cumprod[int(sched.timesteps[-1])]
    assert torch.allclose(last[:2] / ab.sqrt(), out[2:4], atol=0.05)
    with pytest.raises(ValueError, match="cover"):
        autoregressive_sample(window_denoiser, sched, torch.tensor([[0, 1, 2, 3]]), 6, shape,
                              progress=False)
    with pytest.raises(ValueError, match="windows"):
        autoregressive_sample(window_denoiser, sched, torch.tensor([[0, 1, 2, 9]]), 6, shape,
                              progress=False)

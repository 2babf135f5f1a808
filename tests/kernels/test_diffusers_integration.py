"""kernels.integrations.diffusers: the attention3d processors reproduce diffusers' own processors
on tiny random WanTransformer3DModel and CogVideoXTransformer3DModel configs, under the tolerance
rule, on the ref backend and (in Triton's interpreter) the triton backend."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import kernels
from kernels.testing import assert_within_tolerance, triton_test_device

diffusers = pytest.importorskip("diffusers")

from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

from kernels.integrations.diffusers import (  # noqa: E402
    CogVideoXAttention3DProcessor,
    WanAttention3DProcessor,
    positions_from_rope_tables,
    use_attention3d,
)


def _wan(image_dim: int | None = None) -> WanTransformer3DModel:
    torch.manual_seed(0)
    # head dim 16: RoPE parts t, h, w = 8, 4, 4 (WanRotaryPosEmbed's split)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                 attention_head_dim=16, in_channels=4, out_channels=4,
                                 text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 eps=1e-6, image_dim=image_dim, rope_max_seq_len=32).eval()


def _wan_inputs(dtype, image: bool = False):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 4, 3, 6, 4, generator=g)           # [B, C, F, H, W]: grid 3 x 3 x 2
    text = torch.randn(2, 7, 16, generator=g)
    kwargs = {"hidden_states": hidden.to(dtype), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": text.to(dtype), "return_dict": False}
    if image:  # I2V: diffusers takes the last 512 context tokens as text
        kwargs["encoder_hidden_states"] = torch.randn(2, 512, 16, generator=g).to(dtype)
        kwargs["encoder_hidden_states_image"] = torch.randn(2, 3, 8, generator=g).to(dtype)
    return kwargs


def _cogvideox() -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    # head dim 16: RoPE parts t, h, w = 4, 6, 6 (get_3d_rotary_pos_embed's split)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16,
                                       in_channels=4, out_channels=4, time_embed_dim=8,
                                       text_embed_dim=16, num_layers=2, sample_width=12,
                                       sample_height=8, sample_frames=9, patch_size=2,
                                       temporal_compression_ratio=4, max_text_seq_length=5,
                                       use_rotary_positional_embeddings=True).eval()


def _cogvideox_inputs(dtype, grid_type: str):
    g = torch.Generator().manual_seed(2)
    frames, height, width = 3, 8, 12                            # latent; grid 4 x 6 per frame
    hidden = torch.randn(2, frames, 4, height, width, generator=g)
    text = torch.randn(2, 5, 16, generator=g)
    grid = (height // 2, width // 2)
    if grid_type == "linspace":  # CogVideoX 1.0: a crop of a larger base grid, fractional
        tables = get_3d_rotary_pos_embed(16, ((0.5, 1.0), (4.5, 7.0)), grid, frames)
    else:                        # CogVideoX 1.5: slices of an integer grid
        tables = get_3d_rotary_pos_embed(16, None, grid, frames, grid_type="slice",
                                         max_size=(6, 9))
    return {"hidden_states": hidden.to(dtype), "encoder_hidden_states": text.to(dtype),
            "timestep": torch.tensor([10, 500]), "image_rotary_emb": tables,
            "return_dict": False}


def _cast(kwargs, dtype):
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.to(dtype)
        out[name] = value
    return out


def _compare(make_model, inputs, dtype, backend, name):
    """reference: diffusers' processors in float64; baseline: diffusers' processors in dtype;
    actual: ours in dtype on ``backend``."""
    model = make_model()
    with torch.no_grad():
        reference = model.double()(**_cast(inputs, torch.float64))[0]
        baseline = model.to(dtype)(**_cast(inputs, dtype))[0]
        ours = use_attention3d(copy.deepcopy(model))
        with kernels.backend(backend):
            actual = ours(**_cast(inputs, dtype))[0]
    assert actual.dtype == dtype
    assert_within_tolerance(actual, reference, baseline, name=f"{name} {dtype} {backend} output")
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("image", [False, True])
def test_wan_matches_diffusers_on_ref(dtype, image):
    model = _compare(lambda: _wan(8 if image else None), _wan_inputs(dtype, image), dtype, "ref",
                     "wan-i2v" if image else "wan")
    processors = set(map(type, model.attn_processors.values()))
    assert processors == {WanAttention3DProcessor}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid_type", ["linspace", "slice"])
def test_cogvideox_matches_diffusers_on_ref(dtype, grid_type):
    model = _compare(_cogvideox, _cogvideox_inputs(dtype, grid_type), dtype, "ref",
                     f"cogvideox-{grid_type}")
    assert set(map(type, model.attn_processors.values())) == {CogVideoXAttention3DProcessor}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_both_models_match_diffusers_on_triton(dtype):
    """Triton kernels (interpreter on CPU, compiled on a GPU) at the tiny sizes: fp32 and fp16
    (bf16 tl.dot is wrong in the interpreter)."""
    device, reason = triton_test_device()
    if device is None:
        pytest.skip(reason)
    _compare(_wan, _wan_inputs(dtype), dtype, "triton", "wan")
    _compare(_cogvideox, _cogvideox_inputs(dtype, "linspace"), dtype, "triton", "cogvideox")


def test_self_attention_uses_rope_and_cross_attention_does_not(monkeypatch):
    """Wan's attn1 gets the grid positions with interleaved pairs; attn2 (text) gets none."""
    import kernels.integrations.diffusers as integration

    calls = []
    real = integration.attention3d

    def spy(q, k, v, **kwargs):
        calls.append(kwargs)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(integration, "attention3d", spy)
    model = use_attention3d(_wan())
    with torch.no_grad():
        model(**_wan_inputs(torch.float32))
    self_calls = [c for c in calls if c.get("positions") is not None]
    assert len(self_calls) == 2 and len(calls) == 4                    # 2 layers x (self, cross)
    first = self_calls[0]
    assert first["interleaved"] is True and first["rope_dims"] == (8, 4, 4)
    expected = torch.tensor([[t, y, x] for t in range(3) for y in range(3) for x in range(2)])
    assert torch.equal(first["positions"].long(), expected)


def test_cogvideox_text_tokens_get_position_zero(monkeypatch):
    import kernels.integrations.diffusers as integration

    calls = []
    real = integration.attention3d
    monkeypatch.setattr(integration, "attention3d",
                        lambda q, k, v, **kw: calls.append(kw) or real(q, k, v, **kw))
    model = use_attention3d(_cogvideox())
    with torch.no_grad():
        model(**_cogvideox_inputs(torch.float32, "slice"))
    positions = calls[0]["positions"]
    assert positions.shape == (5 + 3 * 4 * 6, 3) and calls[0]["rope_dims"] == (4, 6, 6)
    assert torch.equal(positions[:5], torch.zeros(5, 3))
    assert torch.allclose(positions[5:], torch.tensor(
        [[t, y, x] for t in range(3) for y in range(4) for x in range(6)], dtype=torch.float32),
        atol=1e-4)


def test_positions_from_rope_tables_inverts_fractional_and_large_positions():
    g = torch.Generator().manual_seed(3)
    positions = torch.stack([torch.randint(0, 200, (64,), generator=g).double(),
                             torch.rand(64, generator=g, dtype=torch.float64) * 300 - 20,
                             torch.rand(64, generator=g, dtype=torch.float64) * 90], dim=-1)
    dims = (16, 24, 24)
    from kernels.attention.ref import rope_inv_freq
    angle = torch.cat([positions[:, a:a + 1] * rope_inv_freq(d, 1e4, torch.float64)
                       for a, d in enumerate(dims)], dim=-1).repeat_interleave(2, dim=-1)
    got = positions_from_rope_tables(angle.cos().float(), angle.sin().float(), dims, 1e4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), positions, rtol=0, atol=2e-4)
    with pytest.raises(ValueError, match="image_rotary_emb is not the interleaved 3D RoPE"):
        positions_from_rope_tables(angle.cos().float(), angle.sin().float(), dims, 500.0)


def test_other_models_raise_type_error_naming_the_class():
    with pytest.raises(TypeError, match="got Linear"):
        use_attention3d(torch.nn.Linear(2, 2))
    from diffusers import UNet2DModel
    with pytest.raises(TypeError, match="got UNet2DModel"):
        use_attention3d(UNet2DModel(sample_size=8, block_out_channels=(8,), norm_num_groups=4,
                                    down_block_types=("DownBlock2D",),
                                    up_block_types=("UpBlock2D",), layers_per_block=1))


def test_attention_mask_is_refused():
    model = use_attention3d(_wan())
    attn = model.blocks[0].attn1
    with pytest.raises(ValueError, match="attention_mask"):
        attn.processor(attn, torch.randn(1, 4, 32), None, torch.ones(1, 4, 4), None)


def test_installing_twice_keeps_one_grid_hook():
    model = _wan()
    use_attention3d(model)
    hooks = len(model._forward_pre_hooks)
    assert use_attention3d(model) is model and len(model._forward_pre_hooks) == hooks


def test_import_kernels_imports_neither_diffusers_nor_avatar_models():
    code = ("import sys, kernels, kernels.integrations; kernels.attention3d; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'avatar_models')];"
            " print(bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"

"""MCDM model: memory update, temporal-layer dispatch and switches, causal token order,
frame-aligned attention, identity at init, the stage table, and training on the engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from avatar_models.mcdm import (
    MCDM,
    STAGE_TABLE,
    ArchivedClipPrior,
    MCDMConfig,
    MCDMFaces,
    MCDMTrainConfig,
    MemoryTemporalAttention,
    PresentClipPrior,
    TokenBlock,
    mcdm_system,
    memory_update,
    stage_table_markdown,
    table_entry,
)
from avatar_models.training.engine import EngineConfig, train
from avatar_models.training.sharding import stack_collate


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
def test_memory_update_equals_the_formula_per_frame(alpha):
    feats = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    mem = memory_update(feats, alpha)
    assert mem.shape == feats.shape
    for f in range(6):
        # closed form of M_1 = F_1, M_f = a M_(f-1) + (1 - a) F_f
        expect = alpha ** f * feats[:, 0]
        for j in range(1, f + 1):
            expect = expect + (1 - alpha) * alpha ** (f - j) * feats[:, j]
        torch.testing.assert_close(mem[:, f], expect, rtol=1e-12, atol=1e-12)
    if alpha == 0.0:
        assert torch.equal(mem, feats)
    if alpha == 1.0:
        assert torch.equal(mem, feats[:, :1].expand_as(feats))


def test_memory_carry_over_extension_starts_from_the_given_memory():
    feats, m0 = torch.randn(1, 3, 4), torch.randn(1, 4)
    mem = memory_update(feats, 0.25, initial=m0)
    torch.testing.assert_close(mem[:, 0], 0.25 * m0 + 0.75 * feats[:, 0])


def _temporal(memory=True, temporal="performer"):
    layer = MemoryTemporalAttention(16, 2, alpha=0.1, temporal=temporal, memory=memory,
                                    features=8)
    layer.reset_parameters()
    with torch.no_grad():   # a non-zero output projection so the output shows the path
        layer.proj.weight.copy_(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    return layer


@pytest.fixture
def registry_spy(monkeypatch):
    """Records the sequence length of every call the registry routes to each backend of
    performer_attention and attention3d."""
    from kernels.registry import registry

    kernels.performer_attention  # noqa: B018 - import the ops so they are registered
    kernels.attention3d  # noqa: B018
    calls = {"performer_attention": [], "attention3d": []}
    for op in calls:
        impls = registry.implementations(op)
        for name, impl in list(impls.items()):
            def spy(q, *args, _fn=impl.fn, _op=op, **kw):
                calls[_op].append(q.shape[1])
                return _fn(q, *args, **kw)
            monkeypatch.setitem(impls, name, dataclasses.replace(impl, fn=spy))
    return calls


def test_temporal_layer_dispatches_to_performer_and_switches_change_paths(registry_spy):
    ac, pc = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 16)
    out = _temporal()(ac, pc)
    assert out.shape == (2, 4, 3, 16)
    assert registry_spy["performer_attention"] == [8]          # memory (4) + present (4)
    assert registry_spy["attention3d"] == []
    _temporal(temporal="softmax")(ac, pc)
    assert registry_spy["performer_attention"] == [8]          # unchanged: softmax path
    assert registry_spy["attention3d"] == [8]
    _temporal(memory=False)(ac, pc)
    assert registry_spy["performer_attention"] == [8, 4]       # no memory: f frames only


def test_no_memory_attends_to_the_sum_and_memory_does_not():
    ac, pc = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    plain = _temporal(memory=False)
    assert torch.allclose(plain(ac, pc), plain(pc, ac), atol=1e-6)
    mta = _temporal()
    assert not torch.allclose(mta(ac, pc), mta(pc, ac), atol=1e-3)
    # the kept (lower) half is the present clip: changing pc at frame 2 changes output frame 2
    pc2 = pc.clone()
    pc2[:, 2] += torch.randn(1, 2, 16)
    diff = (mta(ac, pc2) - mta(ac, pc)).abs().amax(dim=(0, 2, 3))
    assert diff[2] > 1e-3


def test_multimodal_causal_block_is_causal_in_token_order():
    block = TokenBlock(32, 2, causal=True)
    _randomise(block, 3)
    x = torch.randn(3, 9, 32)
    base = block(x)
    for j in (4, 8):
        y = x.clone()
        y[:, j] += torch.randn(3, 32)
        out = block(y)
        assert torch.equal(out[:, :j], base[:, :j])
        assert not torch.allclose(out[:, j], base[:, j])


def test_present_prior_token_order_is_causal_end_to_end():
    cfg = MCDMConfig.from_name("tiny")
    prior = PresentClipPrior(cfg)
    _randomise(prior, 4)
    b, f, k = 2, cfg.clip_frames, cfg.motion_tokens
    z = torch.randn(b, f, k, cfg.motion_dim)
    args = (torch.tensor([10, 500]), torch.randn(b, f, cfg.audio_dim), torch.randn(b, 48))
    base = prior(z, *args)
    assert base.shape == (b, f, k, cfg.motion_dim)
    z2 = z.clone()
    z2[:, :, -cfg.expression_tokens:] += 1.0                   # expression: the last slots
    out = prior(z2, *args)
    keep = cfg.head_tokens + cfg.lip_tokens
    assert torch.equal(out[:, :, :keep], base[:, :, :keep])
    assert not torch.allclose(out[:, :, keep:], base[:, :, keep:])


def test_landmark_tokens_replace_the_head_slots():
    cfg = MCDMConfig.from_name("tiny")
    prior = PresentClipPrior(cfg)
    _randomise(prior, 5)
    z = torch.randn(1, cfg.clip_frames, cfg.motion_tokens, cfg.motion_dim)
    head = torch.randn(1, cfg.clip_frames, cfg.head_tokens, cfg.motion_dim)
    args = (torch.tensor([7]), torch.randn(1, cfg.clip_frames, cfg.audio_dim), torch.randn(1, 48))
    z2 = z.clone()
    z2[:, :, : cfg.head_tokens] = torch.randn_like(head)       # ignored when head is given
    assert torch.equal(prior(z, *args, head), prior(z2, *args, head))
    assert not torch.allclose(prior(z, *args, head), prior(z, *args, None))


def test_frame_aligned_attention_shape_and_one_shared_map():
    cfg = MCDMConfig.from_name("tiny", archived_frames=5)
    prior = ArchivedClipPrior(cfg)
    prior.reset_parameters()
    ref = torch.randn(2, 3, 16, 16)
    arch = torch.randn(2, 5, 3, 16, 16)
    out = prior(ref, arch)
    assert out.shape == (2, 5, cfg.prior_queries, cfg.prior_dim)      # [b, a, n, d]
    attn = prior.attention_map(ref)                                    # [b, n, m]
    assert attn.shape == (2, cfg.prior_queries, cfg.archived_tokens)
    for i in range(5):
        f_a = prior.patchify_arch(arch[:, i]).flatten(2).transpose(1, 2)
        torch.testing.assert_close(out[:, i], attn @ prior.w_v(f_a))
    arch2 = arch.clone()
    arch2[:, 3] = torch.randn(2, 3, 16, 16)
    out2 = prior(ref, arch2)
    changed = [(out2[:, i] - out[:, i]).abs().max() > 0 for i in range(5)]
    assert changed == [False, False, False, True, False]
    out3 = prior(ref + 1.0, arch)
    assert all((out3[:, i] - out[:, i]).abs().max() > 0 for i in range(5))


def test_paper_config_and_bad_configs():
    cfg = MCDMConfig.from_name("paper")
    assert (cfg.archived_frames, cfg.archived_tokens, cfg.prior_queries) == (16, 256, 16)
    assert (cfg.prior_layers, cfg.memory_alpha, cfg.clip_frames) == (8, 0.1, 16)
    assert cfg.latent_size * 8 == 512
    with pytest.raises(ValueError, match="memory_alpha"):
        MCDMConfig.from_name("tiny", memory_alpha=1.5)
    with pytest.raises(ValueError, match="temporal"):
        MCDMConfig.from_name("tiny", temporal="flash")
    with pytest.raises(ValueError, match="prior_patch"):
        MCDMConfig.from_name("tiny", prior_patch=3)
    with pytest.raises(ValueError, match="unknown mcdm config"):
        MCDMConfig.from_name("huge")
    assert MCDMConfig.from_dict(cfg.to_dict()) == cfg


def test_untrained_conditioning_layers_are_the_identity():
    cfg = MCDMConfig.from_name("tiny")
    torch.manual_seed(0)
    model = MCDM(cfg).eval()
    z = torch.randn(1, cfg.clip_frames, 3, 16, 16)
    t = torch.tensor([300])
    f_ac = torch.randn(1, cfg.archived_frames, cfg.prior_queries, cfg.prior_dim)
    f_pc = torch.randn(1, cfg.clip_frames, cfg.motion_tokens, cfg.motion_dim)
    with torch.no_grad():
        base = model.denoiser(z, t, f_ac, f_pc)
        assert torch.equal(base, model.denoiser(z, t, f_ac * 3 + 1, f_pc * 2 - 1))


def test_every_parameter_has_a_table_row_and_the_docs_render_it():
    model = MCDM(MCDMConfig.from_name("tiny"))
    rows = {table_entry(n) for n, _ in model.named_parameters()}
    assert rows == set(STAGE_TABLE)
    text = stage_table_markdown()
    for name, row in STAGE_TABLE.items():
        assert name in text and all(src in ("paper", "chosen") for _, src in row)
    with pytest.raises(ValueError, match="stage"):
        model.set_stage(4)


class FixedBatches(torch.utils.data.Dataset):
    """The same few toy samples, forever."""

    def __init__(self, cfg: MCDMConfig, count: int = 2):
        data = MCDMFaces(frames=cfg.clip_frames, archived=cfg.archived_frames,
                         size=cfg.latent_size)
        gen = torch.Generator().manual_seed(0)
        self.items = [data.sample(gen) for _ in range(count)]

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        return self.items[i % len(self.items)]


@pytest.fixture(scope="module")
def fixed_data():
    return FixedBatches(MCDMConfig.from_name("tiny"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_stage_trains_and_freezes_exactly_per_the_table(stage, fixed_data):
    torch.manual_seed(0)
    model = MCDM(MCDMConfig.from_name("tiny"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    system = mcdm_system(model, fixed_data, MCDMTrainConfig(stage=stage), lr=1e-3)
    for name, p in model.named_parameters():
        assert p.requires_grad == STAGE_TABLE[table_entry(name)][stage][0], name
    # two steps: a zero-initialised output projection passes gradient on after its first update
    train(system, EngineConfig(steps=2, batch_size=2, lr=1e-3, ema_decay=0.0, progress=False,
                               device="cpu"))
    changed_rows = set()
    for name, p in model.named_parameters():
        row = table_entry(name)
        if STAGE_TABLE[row][stage][0]:
            if not torch.equal(p, before[name]):
                changed_rows.add(row)
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed in stage {stage}"
    trained_rows = {r for r, row in STAGE_TABLE.items() if row[stage][0]}
    assert changed_rows == trained_rows


def _fixed_loss(model, batch, stage):
    with torch.no_grad():
        return float(model(batch, stage=stage, generator=torch.Generator().manual_seed(5),
                           landmark_drop=0.5)["loss"])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_few_engine_steps_lower_the_loss_on_a_fixed_batch(stage, fixed_data):
    torch.manual_seed(0)
    model = MCDM(MCDMConfig.from_name("tiny"))
    batch = stack_collate(fixed_data.items)
    start = _fixed_loss(model, batch, stage)
    system = mcdm_system(model, fixed_data, MCDMTrainConfig(stage=stage), lr=3e-3)
    train(system, EngineConfig(steps=8, batch_size=2, lr=3e-3, ema_decay=0.0, progress=False,
                               device="cpu"))
    assert _fixed_loss(model, batch, stage) < start


def test_docs_show_the_stage_table_from_the_code():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "mcdm.md").read_text()
    block = text.split("<!-- stage-table -->\n")[1].split("\n<!-- /stage-table -->")[0]
    assert block == stage_table_markdown()


def test_paper_config_builds_with_consistent_shapes_on_the_meta_device():
    cfg = MCDMConfig.from_name("paper")
    with torch.device("meta"):
        model = MCDM(cfg)
        f_ac = model.archived_prior(torch.zeros(1, 4, 64, 64),
                                    torch.zeros(1, cfg.archived_frames, 4, 64, 64))
        motion = model.pose_guider(torch.zeros(1, cfg.clip_frames, 2 * cfg.landmark_points))
    assert f_ac.shape == (1, 16, 16, 768)
    assert motion.shape == (1, 16, cfg.head_tokens, cfg.motion_dim)
    assert len(model.present_prior.causal_blocks) == 8


def test_per_sample_landmark_mask_equals_separate_calls():
    cfg = MCDMConfig.from_name("tiny")
    prior = PresentClipPrior(cfg)
    _randomise(prior, 6)
    z = torch.randn(2, cfg.clip_frames, cfg.motion_tokens, cfg.motion_dim)
    head = torch.randn(2, cfg.clip_frames, cfg.head_tokens, cfg.motion_dim)
    args = (torch.tensor([7, 70]), torch.randn(2, cfg.clip_frames, cfg.audio_dim),
            torch.randn(2, 48))
    mixed = prior(z, *args, head, torch.tensor([True, False]))
    torch.testing.assert_close(mixed[:1], prior(z, *args, head)[:1])
    torch.testing.assert_close(mixed[1:], prior(z, *args, None)[1:])


def test_bad_batches_name_the_key(fixed_data):
    model = MCDM(MCDMConfig.from_name("tiny"))
    batch = stack_collate(fixed_data.items)
    with pytest.raises(ValueError, match="lacks \\['audio'\\]"):
        model({k: v for k, v in batch.items() if k != "audio"}, stage=2)
    with pytest.raises(ValueError, match="batch\\['archived'\\]"):
        model({**batch, "archived": batch["archived"][:, :2]}, stage=1)
    with pytest.raises(ValueError, match="stage"):
        model(batch, stage=7)


@pytest.mark.parametrize("stage", [1, 2])
def test_activation_checkpointing_gives_the_same_losses(stage, fixed_data):
    losses = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MCDM(MCDMConfig.from_name("tiny"))
        system = mcdm_system(model, fixed_data, MCDMTrainConfig(stage=stage), lr=1e-3)
        out = train(system, EngineConfig(steps=2, batch_size=2, lr=1e-3, ema_decay=0.0,
                                         progress=False, device="cpu",
                                         activation_checkpointing=checkpointing))
        losses.append(out.losses)
    torch.testing.assert_close(losses[0], losses[1])

"""LaVieID model: router, TAM, losses, text dropout and the toy's part labels (tiny, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from avatar_models.data import face_parts
from avatar_models.data import procedural_faces as pf
from avatar_models.lavieid import (
    LaVieIDConfig,
    LaVieIDDiT,
    LaVieIDTrainConfig,
    ToyTextEncoder,
    chunk_bounds,
    lavieid_loss,
    route_loss,
    token_fractions,
)

CFG = LaVieIDConfig.from_name("tiny")


def _inputs(cfg=CFG, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.frames, cfg.in_channels, cfg.input_height, cfg.input_width,
                    generator=g)
    return dict(x=x, t=torch.tensor([50.0, 700.0][:b]),
                text=torch.randn(b, cfg.text_tokens, cfg.text_dim, generator=g),
                reference=torch.randn(b, cfg.in_channels, cfg.input_height, cfg.input_width,
                                      generator=g),
                identity=torch.randn(b, cfg.identity_dim, generator=g),
                crops=torch.randn(b, cfg.parts, 3, cfg.crop_size, cfg.crop_size, generator=g))


def _model(cfg=CFG, seed=0) -> LaVieIDDiT:
    """A model whose zero-initialised projections are made non-zero, so the router, the TAM and
    the final layer all change the output."""
    torch.manual_seed(seed)
    m = LaVieIDDiT(cfg)
    with torch.no_grad():
        for layer in (m.router.phi.proj, m.tam.phi.proj, m.final.linear, m.final.modulation[1]):
            layer.weight.normal_(0, 0.2)
        for block in m.blocks:
            block.modulation[1].weight.normal_(0, 0.05)
    return m


def _run(m, inp, **kw):
    parts = m.part_tokens(inp["crops"]) if m.config.router else None
    return m(inp["x"], inp["t"], inp["text"], inp["reference"], inp["identity"], parts, **kw)


def _batch(b=2, cfg=CFG, seed=0):
    ds = face_parts.PartFaces(frames=cfg.frames, size=cfg.input_height, crop_size=cfg.crop_size,
                              seed=seed, text_encoder=ToyTextEncoder(cfg.text_dim,
                                                                     cfg.text_tokens))
    gen = torch.Generator().manual_seed(seed)
    items = [ds.sample(gen) for _ in range(b)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown lavieid config"):
        LaVieIDConfig.from_name("nope")
    with pytest.raises(ValueError, match="input_height"):
        LaVieIDConfig.from_name("tiny", input_height=15)
    with pytest.raises(ValueError, match="hidden / heads"):
        LaVieIDConfig.from_name("tiny", hidden=40)
    big = LaVieIDConfig.from_name("cogvideox-5b")
    assert big.tokens_per_frame == 1350 and big.frames == 13 and big.hidden == 3072
    assert big.text_tokens == 226 and big.part_tokens == 32 and big.local_dim == 2048


def test_shapes_and_route_logits():
    m, inp = _model(), _inputs()
    v, logits = _run(m, inp, return_route_logits=True)
    assert v.shape == inp["x"].shape
    assert logits.shape == (2, CFG.frames * CFG.tokens_per_frame, CFG.parts)


def test_routing_weights_sum_to_one_per_token():
    """z* - z = alpha * W_o (sum_m w_m phi_m): with phi_m = 1 for every part and W_o = I, the
    update is alpha * sum_m w_m, which must be alpha for every token."""
    m, inp = _model(), _inputs()
    router = m.router
    z = torch.randn(2, 40, CFG.hidden)
    parts = m.part_tokens(inp["crops"])
    with torch.no_grad():
        router.phi.proj.weight.copy_(torch.eye(CFG.hidden))
        router.phi.proj.bias.zero_()
    router.phi.attend = lambda x, cond: torch.ones_like(x)
    z_star, logits = router(z, parts, 0.5)
    torch.testing.assert_close(z_star - z, torch.full_like(z, 0.5), rtol=0, atol=1e-6)
    w = logits.softmax(-1)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 40))
    assert (w.std(-1) > 0).all()        # not a uniform constant


def test_alpha_zero_reproduces_baseline_bitwise():
    inp = _inputs()
    on = _model(dataclasses.replace(CFG, router=True, tam=False, alpha=1.0))
    zero = _model(dataclasses.replace(CFG, router=True, tam=False, alpha=0.0))
    off = _model(dataclasses.replace(CFG, router=False, tam=False))
    with torch.no_grad():
        base = _run(off, inp)
        assert torch.equal(_run(zero, inp), base)
        assert not torch.allclose(_run(on, inp), base)


def test_beta_zero_reproduces_baseline_bitwise():
    z = _inputs()["x"]
    m = _model()
    with torch.no_grad():
        assert torch.equal(m.tam(z, 0.0), z)
        assert not torch.allclose(m.tam(z, 0.2), z)
        off = _model(dataclasses.replace(CFG, tam=False))
        assert torch.equal(off.enhance(z), z)


def test_text_tokens_are_unrotated():
    """Text rows at position (0, 0, 0): attention3d with positions equals rotating only the
    video rows and attending without positions."""
    m = _model()
    pos = m.token_positions(CFG.frames, "cpu")
    lt = CFG.text_tokens
    assert torch.equal(pos[:lt], torch.zeros(lt, 3))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, pos.shape[0], 2, 32, generator=g) for _ in range(3))
    out = kernels.attention3d(q, k, v, positions=pos, backend="ref")
    qv = kernels.rope3d(q[:, lt:], pos[lt:], backend="ref")
    kv = kernels.rope3d(k[:, lt:], pos[lt:], backend="ref")
    manual = kernels.attention3d(torch.cat([q[:, :lt], qv], 1), torch.cat([k[:, :lt], kv], 1),
                                 v, backend="ref")
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)


def test_unlabelled_tokens_contribute_zero_route_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 10, 6, generator=g, requires_grad=True)
    frac = torch.rand(2, 10, 6, generator=g) / 6
    frac[:, 3:6] = 0.0                                     # unlabelled tokens
    loss = route_loss(logits, frac)
    loss.backward()
    assert torch.equal(logits.grad[:, 3:6], torch.zeros(2, 3, 6))
    other = logits.detach().clone()
    other[:, 3:6] = 100 * torch.randn(2, 3, 6, generator=g)
    assert torch.equal(route_loss(other, frac), loss.detach())
    with pytest.raises(ValueError, match="fractions"):
        route_loss(logits, frac[:, :5])


def test_token_fractions_are_area_averages():
    labels = torch.zeros(1, 1, 6, 4, 4)
    labels[0, 0, 2, :2, :2] = 1.0                          # mouth fills token (0, 0)
    labels[0, 0, 1, 0, 2] = 1.0                            # eyes: a quarter of token (0, 1)
    frac = token_fractions(labels, 2)
    assert frac.shape == (1, 4, 6)
    assert frac[0, 0, 2] == 1 and frac[0, 1, 1] == 0.25 and frac[0, 3].sum() == 0


def test_route_loss_falls_and_local_encoder_gets_gradients():
    cfg = dataclasses.replace(CFG, tam=False)
    m = _model(cfg)
    batch = _batch(2)
    train = LaVieIDTrainConfig(text_drop=0.0)
    for p in m.baseline_parameters():
        p.requires_grad_(False)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for step in range(12):
        out = lavieid_loss(m, cfg, train, batch, torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        out["route"].backward()
        if step == 0:
            grads = [p.grad for p in m.local_encoder.parameters()]
            assert all(gr is not None for gr in grads)
            assert sum(float(gr.abs().sum()) for gr in grads) > 0
        opt.step()
        losses.append(float(out["route"].detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_full_loss_has_all_terms_and_trains_only_modules():
    from avatar_models.lavieid import lavieid_system

    m = _model()
    system = lavieid_system(m, None, LaVieIDTrainConfig(stage="modules"), lr=1e-4)
    out = system.loss(m, _batch(2), torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "diff", "route", "tam"}
    out["loss"].backward()
    assert all(p.grad is None for p in m.blocks.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.tam.parameters())
    group = system.param_groups(m)[0]
    assert {id(p) for p in group["params"]} == {
        id(p) for mod in (m.local_encoder, m.router, m.tam) for p in mod.parameters()}


def test_text_dropout_rate_and_null_embedding():
    m = _model(dataclasses.replace(CFG, router=False, tam=False))
    inp = _inputs()
    other = torch.randn_like(inp["text"])
    null = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        a = _run(m, inp, text_null=null)
        b = _run(m, {**inp, "text": other}, text_null=null)
        c = _run(m, {**inp, "text": other})
    assert torch.equal(a, b) and not torch.allclose(b, c)

    seen = []

    class Stub(torch.nn.Module):
        def forward(self, x, t, text, reference, identity, *, text_null, crops,
                    tam_alpha_sigma):
            seen.append(text_null)
            return torch.zeros_like(x), None, None

    cfg = LaVieIDConfig.from_name("tiny", frames=1, input_height=4, input_width=4, router=False,
                                  tam=False)
    n = 4000
    batch = {"frames": torch.zeros(n, 1, 3, 4, 4), "text": torch.zeros(n, 8, 16),
             "reference": torch.zeros(n, 3, 4, 4), "identity": torch.zeros(n, 48)}
    lavieid_loss(Stub(), cfg, LaVieIDTrainConfig(text_drop=0.1), batch,
                 torch.Generator().manual_seed(0))
    rate = seen[0].float().mean().item()
    assert abs(rate - 0.1) < 0.02, rate                    # 4 sigma at n = 4000


def test_chunk_bounds_non_divisible_and_small():
    assert chunk_bounds(13, 4) == [(0, 4), (4, 7), (7, 10), (10, 13)]
    assert chunk_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert chunk_bounds(3, 4) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="frames and chunks"):
        chunk_bounds(0, 4)


def test_tam_frame_ids_and_teacher_forcing_position(monkeypatch):
    cfg = dataclasses.replace(CFG, frames=13, tam_chunks=4, tam_layers=1)
    m = _model(cfg)
    calls = []
    real = kernels.frame_causal_attention

    def spy(q, k, v, *, frame_ids, **kw):
        calls.append(frame_ids.clone())
        return real(q, k, v, frame_ids=frame_ids, **kw)

    monkeypatch.setattr(kernels, "frame_causal_attention", spy)
    z = torch.randn(1, 13, 3, cfg.input_height, cfg.input_width)
    with torch.no_grad():
        out = m.tam(z, 0.2)
    assert out.shape == z.shape                            # no duplicated prepended frame
    p = cfg.tokens_per_frame
    assert len(calls) == 4
    expect = [list(range(0, 4)), [3, *range(4, 7)], [6, *range(7, 10)], [9, *range(10, 13)]]
    for ids, frames in zip(calls, expect):
        assert ids.tolist() == [f for f in frames for _ in range(p)]


def test_later_chunk_leaves_earlier_chunks_bitwise_unchanged():
    cfg = dataclasses.replace(CFG, frames=7, tam_chunks=3)     # chunks (0,3) (3,5) (5,7)
    m = _model(cfg)
    z = torch.randn(1, 7, 3, cfg.input_height, cfg.input_width)
    z2 = z.clone()
    z2[:, 5:] += torch.randn_like(z2[:, 5:])
    z3 = z.clone()
    z3[:, 3] += 1.0
    with torch.no_grad():
        a, b, c = m.tam(z, 0.2), m.tam(z2, 0.2), m.tam(z3, 0.2)
    assert torch.equal(a[:, :5], b[:, :5])
    assert torch.equal(a[:, :3], c[:, :3])
    # the teacher-forcing frame carries chunk 2's change into chunk 3's enhancement
    assert not torch.allclose(a[:, 5:] - z[:, 5:], c[:, 5:] - z3[:, 5:])


def _palette_distance(rgb: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Max-channel distance of colours [N, 3] to the nearest blend of two palette colours
    (anti-aliased edges inside a part, e.g. sclera and iris, mix their colours)."""
    best = torch.full((rgb.shape[0],), float("inf"))
    for a in palette:
        for b in palette:
            d = b - a
            w = ((rgb - a) @ d / (d @ d).clamp_min(1e-12)).clamp(0, 1)
            best = torch.minimum(best, (rgb - (a + w[:, None] * d)).abs().amax(-1))
    return best


@pytest.mark.parametrize("world", ["plain", "parts"])
def test_toy_part_labels_agree_with_the_render(world):
    for seed in (0, 5, 11):
        ident = pf.sample_identity(seed, world)
        params = face_parts.motion_program("a person smiling, gaping and tilting", 3, seed)
        video, _ = pf.render(ident, params)                          # [T, 3, 64, 64]
        labels = face_parts.part_labels(ident, params)              # [T, M, 64, 64]
        assert labels.shape == (3, 6, 64, 64)
        assert (labels.sum(1) <= 1 + 1e-5).all()
        rgb = video.permute(0, 2, 3, 1)                              # [T, 64, 64, 3]
        colours = {"skin": [ident.skin], "hair": [ident.hair],
                   "mouth": [ident.lips, pf.MOUTH_INSIDE],
                   "eyes": [pf.LINER, pf.SCLERA, ident.iris],
                   "brows": [pf.part_geometry(ident).brow],
                   "nose": [tuple(0.82 * c for c in ident.skin)]}
        for i, part in enumerate(face_parts.PARTS):
            pure = labels[:, i] > 0.999
            assert pure.any(), (seed, part)
            dist = _palette_distance(rgb[pure], torch.tensor(colours[part]))
            assert (dist < 0.05).float().mean() > 0.9, (seed, part)
        unlabelled = labels.sum(1) < 1e-3
        assert unlabelled.any()


def test_parts_world_changes_only_the_parts_and_they_differ_between_identities():
    """Same seed, plain vs parts world: the coarse attributes and every pixel outside the
    eyes, brows and mouth are identical; the part attributes come from their own stream and
    vary between identities (iris, lip and brow colours far apart; brow and lip shapes)."""
    params = face_parts.motion_program("a person smiling, talking", 2, 3)
    attrs = []
    for seed in range(12):
        plain, parts = pf.sample_identity(seed), pf.sample_identity(seed, "parts")
        assert parts.skin == plain.skin and parts.hair == plain.hair and parts.fine is None
        a, _ = pf.render(plain, params)
        b, expressive = pf.render(parts, params)
        near_parts = torch.nn.functional.max_pool2d(expressive, 5, 1, 2) > 0   # thick brows
        assert torch.equal(a * ~near_parts, b * ~near_parts), seed
        assert not torch.equal(a, b)
        attrs.append((parts.iris, parts.lips, parts.parts.brow, parts.parts.brow_slant,
                      parts.parts.lip_thickness))
    for k in range(3):  # colours: the 12 identities span a wide range per part
        colours = torch.tensor([a[k] for a in attrs])
        assert torch.cdist(colours, colours).max() > 0.8
    assert torch.tensor([a[3] for a in attrs]).std() > 0.8
    assert torch.tensor([a[4] for a in attrs]).std() > 0.4
    with pytest.raises(ValueError, match="seed"):
        pf.sample_part_attributes(-1)


def test_window_view_and_label_view():
    video, _ = pf.render(pf.sample_identity(2, "parts"), face_parts.reference_pose(4))
    whole = face_parts.window_view(video, 64, 16)
    assert torch.allclose(whole, torch.nn.functional.interpolate(video, size=16, mode="area"))
    zoomed = face_parts.window_view(video, 48, 32)
    assert zoomed.shape == (1, 3, 32, 32)
    assert torch.allclose(zoomed, torch.nn.functional.interpolate(video[..., 6:54, 8:56],
                                                                  size=32, mode="area"))
    labels = face_parts.part_labels(pf.sample_identity(2, "parts"), face_parts.reference_pose(4))
    assert face_parts.label_view(labels, 48, 32).shape == (1, 6, 32, 32)
    assert face_parts.label_view(labels, 32, 16).shape == (1, 6, 32, 32)
    assert face_parts.label_view(labels, 64, 16).shape == (1, 6, 64, 64)
    for bad in (12, 66, 47):
        with pytest.raises(ValueError, match="window"):
            face_parts.window_view(video, bad, 16)


def test_prompt_program_and_dataset_item():
    assert face_parts.parse_prompt("A person Smiling, blinking") == {
        "expression": "smiling", "eyes": "blinking", "mouth": "silent", "head": "still"}
    p = face_parts.motion_program("a person nodding", 6, 0)
    assert p[:, 1].abs().max() > 0.3 and p[:, 0].abs().max() == 0 and p[:, 2].abs().max() == 0
    item = _batch(1)
    assert item["frames"].shape == (1, CFG.frames, 3, 16, 16)
    assert item["crops"].shape == (1, 6, 3, CFG.crop_size, CFG.crop_size)
    assert item["labels"].shape == (1, CFG.frames, 6, 64, 64)
    assert not torch.equal(item["reference"], item["frames"][:, 0])
    with pytest.raises(TypeError, match="prompt"):
        face_parts.parse_prompt(3)


def test_training_forward_crops_and_tam_on_x0_hat():
    """crops encoded inside forward equal precomputed part tokens; the TAM term's input is the
    x0-hat of the v prediction (alpha x - sigma v), enhanced once."""
    m, inp = _model(), _inputs()
    a, s = torch.tensor(0.6).view(1, 1, 1, 1, 1), torch.tensor(0.8).view(1, 1, 1, 1, 1)
    with torch.no_grad():
        v, logits, tam_x0 = m(inp["x"], inp["t"], inp["text"], inp["reference"],
                              inp["identity"], crops=inp["crops"], tam_alpha_sigma=(a, s))
        v2, logits2 = _run(m, inp, return_route_logits=True)
        assert torch.equal(v, v2) and torch.equal(logits, logits2)
        assert torch.equal(tam_x0, m.tam(a * inp["x"] - s * v, CFG.beta))
    with pytest.raises(ValueError, match="parts or crops"):
        m(inp["x"], inp["t"], inp["text"], inp["reference"], inp["identity"])
    with pytest.raises(ValueError, match="identity must be"):
        m(inp["x"], inp["t"], inp["text"], inp["reference"], inp["identity"][:, :5])
    with pytest.raises(ValueError, match="reference must be"):
        m(inp["x"], inp["t"], inp["text"], inp["reference"][:1], inp["identity"])
    with pytest.raises(ValueError, match="crops must be"):
        m(inp["x"], inp["t"], inp["text"], inp["reference"], inp["identity"],
          crops=inp["crops"][:, :5])
    with pytest.raises(ValueError, match="text must be"):
        m(inp["x"], inp["t"], inp["text"][:, :3], inp["reference"], inp["identity"])
    batch = _batch(1)
    batch["labels"] = batch["labels"][..., :60, :60]
    with pytest.raises(ValueError, match="labels"):
        lavieid_loss(m, CFG, LaVieIDTrainConfig(), batch)


@pytest.mark.slow
def test_triton_backends_match_reference():
    """The model and the TAM on the Triton kernels (text rows at RoPE position 0 in
    attention3d, frame-index RoPE in frame_causal_attention) match the reference backends
    (fp32; under TRITON_INTERPRET on CPU, ~10 s)."""
    cfg = dataclasses.replace(CFG, frames=3, input_height=8, input_width=8, tam_chunks=2,
                              tam_layers=1, depth=1)
    ref = _model(cfg)
    tri = LaVieIDDiT(cfg, attention_backend="triton")
    tri.load_state_dict(ref.state_dict())
    for m in (ref, tri):
        for mod in m.modules():
            if hasattr(mod, "backend"):
                mod.backend = "ref" if m is ref else "triton"
    inp = _inputs(cfg, b=1)
    args = (inp["x"], inp["t"], inp["text"], inp["reference"], inp["identity"])
    with torch.no_grad():
        a, b = ref(*args, crops=inp["crops"]), tri(*args, crops=inp["crops"])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tri.enhance(a), ref.enhance(a), rtol=1e-4, atol=1e-4)


def test_t5_text_encoder_loads_a_local_folder(tmp_path):
    """A tiny random T5 encoder and word-level tokenizer saved to a folder: padded to the
    configured token count, text-dependent, nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from avatar_models.lavieid import T5TextEncoder

    words = ["<pad>", "</s>", "<unk>", "a", "person", "smiling"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                            num_heads=2)).save_pretrained(tmp_path)
    out = T5TextEncoder(tmp_path, tokens=8)(["a person smiling", "a person"])
    assert out.shape == (2, 8, 16)
    assert not torch.allclose(out[0, 2], out[1, 2])


def test_toy_text_encoder():
    enc = ToyTextEncoder(16, 4)
    a, b = enc(["a person smiling", "a person frowning, talking and nodding"])
    assert torch.equal(a[:2], b[:2]) and not torch.allclose(a[2], b[2])
    assert torch.equal(a[3], torch.zeros(16)) and b[3].abs().sum() > 0   # padded / cut
    with pytest.raises(TypeError, match="prompts"):
        enc([3])

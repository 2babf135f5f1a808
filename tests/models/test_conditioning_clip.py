"""CLIPEncoder over a tiny random CLIPModel + tokenizer saved to disk; embedding mixing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from avatar_models.conditioning.clip import CLIPEncoder, edit_embedding, mix_embeddings

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, clip_tokenizer_saver):
    torch.manual_seed(0)
    text = dict(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path, safe_serialization=True)
    clip_tokenizer_saver(path)
    return path


@pytest.fixture(scope="module")
def clip(clip_dir):
    return CLIPEncoder.from_pretrained(clip_dir)


def test_image_embeddings(clip):
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 40, 56, 3), dtype=torch.uint8, generator=g)
    emb = clip.encode_images(u8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # the float [-1, 1] channels-first convention gives the same embedding
    as_float = u8.permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(clip.encode_images(as_float), emb, atol=1e-5, rtol=1e-4)
    # a single image works and distinct images differ
    torch.testing.assert_close(clip.encode_images(u8[1]), emb[1:2], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)
    raw = clip.encode_images(u8, normalize=False)
    torch.testing.assert_close(F.normalize(raw, dim=-1), emb)
    assert clip.image_tokens(u8).shape == (3, 1 + (IMAGE_SIZE // 8) ** 2, 16)


def test_preprocess_resizes_short_side_and_centre_crops(clip):
    x = torch.zeros(1, 3, 32, 64)
    x[..., 16:48] = 1.0  # bright centre band: survives the centre crop, sides do not
    pix = clip.preprocess(x)
    assert pix.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(pix, ((torch.ones(1, 3, 32, 32) - mean) / std))
    with pytest.raises(ValueError, match=r"images must be float \[N, 3, H, W\]"):
        clip.preprocess(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, 3\]"):
        clip.preprocess(torch.zeros(1, 8, 8, 4, dtype=torch.uint8))


def test_text_embeddings(clip):
    emb = clip.encode_text(["a cat", "a dog", "a cat"])
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb[0], emb[2])
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)
    ids, mask = clip.tokenize("a cat")
    assert ids.shape == (1, 16) and ids[0, 0] == 0 and 1 in ids[0].tolist()
    torch.testing.assert_close(clip.encode_text(input_ids=ids, attention_mask=mask), emb[:1])
    with pytest.raises(ValueError, match="exactly one of texts or input_ids"):
        clip.encode_text()
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        clip.encode_text(input_ids=torch.zeros(1, 4))


def test_mix_embeddings():
    g = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    b = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    torch.testing.assert_close(mix_embeddings(a, b, 0.0), a)
    torch.testing.assert_close(mix_embeddings(a, b, 1.0), b)
    mid = mix_embeddings(a, b, 0.5)
    torch.testing.assert_close(mid.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close((mid * a).sum(-1), (mid * b).sum(-1))  # equal angles
    # slerp at 0.25 sits at a quarter of the angle
    ang = torch.arccos((a * b).sum(-1))
    q = mix_embeddings(a, b, 0.25)
    torch.testing.assert_close(torch.arccos((q * a).sum(-1).clamp(-1, 1)), ang / 4,
                               atol=1e-4, rtol=1e-4)
    lerp = mix_embeddings(a, b, 0.25, mode="lerp")
    torch.testing.assert_close(lerp, F.normalize(0.75 * a + 0.25 * b, dim=-1))
    torch.testing.assert_close(mix_embeddings(a, a * 3, 0.3), a)  # parallel inputs
    assert mix_embeddings(a, b[0], 0.5).shape == (4, 8)  # broadcast one text over images
    with pytest.raises(ValueError, match="text_emb must have D=8"):
        mix_embeddings(a, torch.randn(4, 5))
    with pytest.raises(ValueError, match="mode must be"):
        mix_embeddings(a, b, mode="cubic")


def test_edit_embedding():
    g = torch.Generator().manual_seed(4)
    img, src, tgt = (F.normalize(torch.randn(2, 8, generator=g), dim=-1) for _ in range(3))
    torch.testing.assert_close(edit_embedding(img, src, src), img)
    out = edit_embedding(img, src, tgt, strength=0.5)
    torch.testing.assert_close(out, F.normalize(img + 0.5 * (tgt - src), dim=-1))
    assert ((out * tgt).sum(-1) > (img * tgt).sum(-1)).all()  # moved toward the target text


def test_missing_folder_and_tokenizer(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match="missing_clip.*CLIPModel"):
        CLIPEncoder.from_pretrained(tmp_path / "missing_clip")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((clip_dir / f).read_bytes())
    enc = CLIPEncoder.from_pretrained(bare)
    assert enc.encode_images(torch.zeros(1, 3, 32, 32)).shape == (1, 8)
    with pytest.raises(ValueError, match="no tokenizer"):
        enc.encode_text("a cat")

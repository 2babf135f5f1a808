"""LaVieID sampling and its commands: call counts, DDIM/CFG, the CLI writing an mp4."""

from __future__ import annotations

import pytest
import torch

from avatar_models.lavieid import LaVieIDConfig, LaVieIDDiT
from samplers.cli import main
from samplers.lavieid import LaVieIDSettings, ddim_scheduler, lavieid_sample

CFG = LaVieIDConfig.from_name("tiny")


def _conditions(b=1):
    g = torch.Generator().manual_seed(0)
    return dict(text=torch.randn(b, CFG.text_tokens, CFG.text_dim, generator=g),
                reference=torch.randn(b, 3, CFG.input_height, CFG.input_width, generator=g),
                identity=torch.randn(b, CFG.identity_dim, generator=g),
                crops=torch.randn(b, CFG.parts, 3, CFG.crop_size, CFG.crop_size, generator=g))


def _shape():
    return (CFG.frames, CFG.in_channels, CFG.input_height, CFG.input_width)


def test_router_every_step_both_branches_and_tam_once():
    torch.manual_seed(0)
    model = LaVieIDDiT(CFG).eval()
    calls = {"router": [], "tam": 0, "encoder": 0}
    model.router.register_forward_hook(lambda mod, args, out: calls["router"].append(
        args[0].shape[0]))
    model.local_encoder.register_forward_hook(
        lambda mod, args, out: calls.__setitem__("encoder", calls["encoder"] + 1))
    model.tam.register_forward_hook(
        lambda mod, args, out: calls.__setitem__("tam", calls["tam"] + 1))
    b = 2
    out = lavieid_sample(model, **_conditions(b), latent_shape=_shape(),
                         encode_parts=model.part_tokens, enhance=model.enhance,
                         settings=LaVieIDSettings(steps=3, guidance=6.0),
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (b, *_shape())
    assert len(calls["router"]) == 3 * 2 and set(calls["router"]) == {b}
    assert calls["tam"] == 1 and calls["encoder"] == 1


def test_guidance_combines_the_two_branches():
    seen = []

    def model(x, t, text, reference, identity, parts, *, text_null):
        seen.append(bool(text_null.all()))
        return torch.full_like(x, 0.0 if text_null.all() else 1.0)

    settings = LaVieIDSettings(steps=1, guidance=6.0)
    gen = torch.Generator().manual_seed(0)
    cond = _conditions()
    out = lavieid_sample(model, **cond, latent_shape=_shape(), settings=settings,
                         generator=gen)
    # one DDIM step from x_T with v = 6: compare with the scheduler itself
    x = torch.randn((1, *_shape()), generator=torch.Generator().manual_seed(0))
    sched = ddim_scheduler(1)
    expect = sched.step(torch.full_like(x, 6.0), sched.timesteps[0], x).prev_sample
    torch.testing.assert_close(out, expect)
    assert seen == [False, True]


def test_settings_and_inputs_are_checked():
    with pytest.raises(ValueError, match="steps"):
        LaVieIDSettings(steps=0)
    with pytest.raises(ValueError, match="latent_shape"):
        lavieid_sample(lambda *a, **k: None, **_conditions(), latent_shape=(1, 2, 3))
    cond = _conditions(2)
    cond["identity"] = cond["identity"][:1]
    with pytest.raises(ValueError, match="identity"):
        lavieid_sample(lambda *a, **k: None, **cond, latent_shape=_shape())


def test_defaults_are_consisid_sampling():
    s = LaVieIDSettings()
    assert (s.steps, s.guidance) == (50, 6.0)
    sched = ddim_scheduler(50)
    assert len(sched.timesteps) == 50 and sched.config.prediction_type == "v_prediction"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("lavieid")
    base = d / "base.safetensors"
    both = d / "both.safetensors"
    assert main(["train", "lavieid", "--stage", "base", "--steps", "1", "--batch-size", "1",
                 "--out", str(base), "--no-progress"]) == 0
    assert main(["train", "lavieid", "--stage", "modules", "--init", str(base), "--steps", "1",
                 "--batch-size", "1", "--out", str(both), "--no-progress"]) == 0
    return d, base, both


def test_cli_train_and_sample_write_an_mp4(trained):
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.data import procedural_faces as pf
    from avatar_models.media import to_uint8_frames, video_info, write_image

    d, base, both = trained
    meta = load_checkpoint(both, system="lavieid")
    assert meta.config["router"] and meta.config["tam"]
    assert not load_checkpoint(base, system="lavieid").config["router"]
    video, _ = pf.render(pf.sample_identity(3), pf.sample_motion(1, 1))
    face = write_image(d / "face.png", to_uint8_frames(video[0] * 2 - 1))
    out = d / "out.mp4"
    assert main(["sample", "lavieid", "--checkpoint", str(both), "--reference", str(face),
                 "--prompt", "a person smiling, talking", "--out", str(out), "--steps", "2",
                 "--no-progress"]) == 0
    info = video_info(out)
    assert info.num_frames == CFG.frames


def test_cli_errors_before_any_model(tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert main(["train", "lavieid", "--stage", "base", "--no-router", "--out", out]) == 2
    assert "--no-router" in capsys.readouterr().err
    assert main(["train", "lavieid", "--stage", "modules", "--no-router", "--no-tam",
                 "--out", out]) == 2
    assert main(["train", "lavieid", "--stage", "base", "--set", "beta=nan", "--out", out]) == 2
    face = tmp_path / "f.png"
    face.write_bytes(b"")
    assert main(["sample", "lavieid", "--checkpoint", str(tmp_path / "missing.safetensors"),
                 "--reference", str(face), "--prompt", "a", "--out",
                 str(tmp_path / "o.mp4")]) == 2

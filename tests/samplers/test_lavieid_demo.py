"""LaVieID's toy Table 2: the metrics (KID, VBench-style consistency, part colours, the clip
metrics against the ideal video), the training recipe's commands and a demo smoke run on tiny
random checkpoints made here."""

from __future__ import annotations

import json

import pytest
import torch

from avatar_models import metrics
from avatar_models.data import face_parts
from avatar_models.data import procedural_faces as pf
from samplers.cli import main


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    same = metrics.kid(a, b)
    assert abs(same) < 0.02
    shifted = [metrics.kid(a + s, b) for s in (0.25, 0.5, 1.0)]
    assert same < shifted[0] < shifted[1] < shifted[2]
    assert metrics.kid(a + 1.0, b) == pytest.approx(metrics.kid(b, a + 1.0))
    # unbiased: the diagonal is left out, so a set against itself is not exactly 0 but the
    # same value as the formula by hand
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    k = (x @ x.T / 3 + 1) ** 3
    off = (k.sum() - k.diagonal().sum()) / 20
    assert metrics.kid(x, x) == pytest.approx(float(2 * off - 2 * k.mean()))
    with pytest.raises(ValueError, match="generated and real"):
        metrics.kid(a, b[:, :3])
    with pytest.raises(ValueError, match="generated and real"):
        metrics.kid(a[:1], b)
    with pytest.raises(TypeError, match="generated"):
        metrics.kid([[1.0]], b)


def test_vbench_consistency_first_and_previous_frame():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert metrics.vbench_consistency(e) == pytest.approx(1.0)
    # frames: e0, e1 orthogonal to e0, e2 = e1: t=1 -> (0 + 0) / 2, t=2 -> (0 + 1) / 2
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert metrics.vbench_consistency(e) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.vbench_consistency(e[:1])
    with pytest.raises(ValueError, match="embeddings"):
        metrics.vbench_consistency(e[0])


def test_part_colours_weight_pixels_by_their_fraction():
    frames = torch.zeros(1, 3, 4, 4)
    frames[0, 0, :2] = 1.0                      # top half red
    labels = torch.zeros(1, 2, 4, 4)
    labels[0, 0, :2] = 1.0                      # part 0: the red half
    labels[0, 0, 2, :] = 0.5                    # plus half of a black row
    colours, visible = face_parts.part_colours(frames, labels)
    assert colours[0, 0].tolist() == pytest.approx([8 / 10, 0, 0])
    assert visible.tolist() == [[True, False]]
    with pytest.raises(ValueError, match="frames"):
        face_parts.part_colours(frames, labels[..., :3])


def _inputs(count=2):
    from avatar_models.lavieid import ToyTextEncoder
    from samplers.demo.lavieid_table import eval_inputs

    return eval_inputs(count, frames=3, size=16, crop_size=8, window=48,
                       text_encoder=ToyTextEncoder(16, 8))


def test_clip_metrics_are_perfect_on_the_ideal_video_and_worse_off_it():
    from samplers.demo.lavieid_table import clip_metrics

    inp = _inputs(1)[0]
    assert inp["seed"] >= pf.HELD_OUT_SEED_BASE and inp["reference_pose_gap"] > 0
    ideal = clip_metrics(inp["ideal"], inp)
    assert ideal["identity_similarity"] == pytest.approx(1.0)
    assert ideal["prompt_adherence"] > 0.5 and ideal["flicker"] == 0.0
    assert ideal["background_consistency"] == pytest.approx(1.0)   # the background is static
    # another identity with the same prompt and motion: the parts' colours are wrong
    other = face_parts.window_view(pf.render(
        pf.sample_identity(inp["seed"] + 1, "parts"),
        face_parts.motion_program(inp["prompt"], 3, 7919))[0], 48, 16)
    assert clip_metrics(other, inp)["identity_similarity"] < 0.97
    noisy = (inp["ideal"] + 0.2 * torch.randn(inp["ideal"].shape,
                                              generator=torch.Generator().manual_seed(0)))
    worse = clip_metrics(noisy.clamp(0, 1), inp)
    assert worse["flicker"] > 0.05
    assert worse["background_consistency"] < ideal["background_consistency"]


def test_recipe_commands_give_every_arm_the_same_budget(tmp_path):
    from samplers.demo.lavieid_train import ARMS, LaVieIDRecipe, commands

    runs = commands(LaVieIDRecipe(), tmp_path)
    assert [name for name, _ in runs] == ["base", *[f"{a}_s{s}" for s in (1, 2) for a in ARMS]]
    budgets = set()
    for name, argv in runs[1:]:
        assert argv[argv.index("--init") + 1] == str(tmp_path / "base.safetensors")
        budgets.add(tuple(argv[argv.index(k) + 1] for k in ("--steps", "--batch-size", "--lr")))
        stage = argv[argv.index("--stage") + 1]
        assert stage == ("base" if name.startswith("baseline") else "modules")
    assert budgets == {("80", "8", "0.001")}


def _tiny_checkpoints(folder):
    """base + the four arms of seed 1, tiny random models: the TAM arm shares the base DiT, the
    baseline arm's DiT differs, the router arm's router output projection is non-zero."""
    from avatar_models.checkpoint import save_checkpoint
    from avatar_models.lavieid import LaVieIDConfig, LaVieIDDiT

    cfg = LaVieIDConfig.from_name("tiny", frames=3)
    torch.manual_seed(0)
    base = LaVieIDDiT(LaVieIDConfig.from_dict({**cfg.to_dict(), "router": False,
                                               "tam": False}))
    with torch.no_grad():
        base.final.linear.weight.normal_(0, 0.05)
    extra = {"data": {"kind": "toy", "text": "toy", "window": 48, "world": "parts"}}
    state = base.state_dict()
    arms = {"base": (False, False), "baseline_s1": (False, False), "router_s1": (True, False),
            "tam_s1": (False, True), "both_s1": (True, True)}
    for name, (router, tam) in arms.items():
        model = LaVieIDDiT(LaVieIDConfig.from_dict({**cfg.to_dict(), "router": router,
                                                    "tam": tam}))
        model.load_state_dict(state)
        with torch.no_grad():
            if name == "baseline_s1":
                model.final.linear.bias.add_(0.01)
            for proj in (model.router.phi.proj, model.tam.phi.proj):
                proj.weight.normal_(0, 0.1)
        save_checkpoint(folder / f"{name}.safetensors", model, system="lavieid",
                        config=model.config.to_dict(), extra=extra)
    (folder / "training.json").write_text(json.dumps({"recipe": {"seeds": [1]}}))


def test_demo_smoke_on_tiny_random_checkpoints(tmp_path, capsys):
    from samplers.demo.lavieid_table import PREDICTIONS

    _tiny_checkpoints(tmp_path)
    out = tmp_path / "out"
    assert main(["demo", "lavieid", "--checkpoints", str(tmp_path), "--out", str(out),
                 "--identities", "2", "--steps", "2", "--no-progress"]) == 0
    result = json.loads((out / "table.json").read_text())
    assert result["tam_arm_dit_equals_base"] == {"tam_s1": True}
    assert len(result["inputs"]) == 2 and len(result["predictions"]) == len(PREDICTIONS)
    assert {p["status"] for p in result["predictions"]} <= {
        "held", "direction only (interval includes 0)", "failed"}
    for arm in ("base", "baseline", "router", "tam", "both"):
        row = result["table"][arm]
        assert row["identity_similarity"]["n"] == 2 and "kid" in row
    assert result["table"]["ideal"]["identity_similarity"]["mean"] == pytest.approx(1.0)
    assert result["table"]["copy reference"]["flicker"]["mean"] <= 0   # a still video
    assert set(result["base_denoising"]) == {"100", "300", "600", "900"}
    # the router arm samples differently from the baseline; the TAM changes the base samples
    diffs = result["differences"]
    assert diffs["router - baseline"]["identity_similarity"]["mean"] != 0
    assert diffs["tam after - before TAM (same samples)"]["flicker"]["mean"] != 0
    assert (out / "samples.png").is_file() and "prediction" in (out / "table.md").read_text()


def test_demo_errors_name_the_option(tmp_path, capsys):
    assert main(["demo", "lavieid", "--checkpoints", str(tmp_path), "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    assert "make train-lavieid" in capsys.readouterr().err
    assert main(["demo", "lavieid", "--train", "--train-only", "seed:9",
                 "--checkpoints", str(tmp_path)]) == 2
    assert "--train-only" in capsys.readouterr().err

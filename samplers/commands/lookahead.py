"""Lookahead Anchoring's ``avatar-kernels`` verbs: ``train`` and ``sample``.

``samplers/cli.py`` finds this module through its SYSTEMS table.

    avatar-kernels train lookahead --stage base --config tiny --out base.safetensors
    avatar-kernels train lookahead --stage lookahead --init base.safetensors \\
        --d-max 12 --distance 12 --out lookahead.safetensors
    avatar-kernels train lookahead --stage base --init base.safetensors \\
        --out baseline.safetensors            # the baseline arm: same steps, reference only
    avatar-kernels train lookahead --stage lookahead --fixed-anchor ...    # Table 5 ablation
    avatar-kernels train lookahead --stage lookahead --past-time ...       # Table 4 arm
    avatar-kernels sample lookahead --checkpoint lookahead.safetensors --reference face.png \\
        --audio speech.wav --out out.mp4 [--distance 12] [--keyframe 4.0=other.png]

train data: the toy world by default (:class:`avatar_models.lookahead.LookaheadFaces`: procedural
faces at 25 fps with an energy-envelope audio feature of a waveform synthesised from the
ground-truth mouth opening; square pixels, r = 1), or ``--dataset MODULE:FACTORY`` returning
samples in the same layout (``frames`` [past + n + ahead, C, H, W], ``audio`` [n r, A]).

sample: frames are the checkpoint's pixels, or FrameVAE latents (``--vae DIR``, r = 1); audio
features are the checkpoint's kind: ``energy`` (the toy's, weight-free) or ``wav2vec``
(``--wav2vec DIR``, a local Wav2Vec2 folder). Keyframes: the reference itself (self-keyframing)
unless ``--keyframe TIME=IMAGE`` entries give a narrative schedule (the reference holds from 0 s).
Each segment is decoded and appended to the mp4 (with its audio) before the next starts.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch

from samplers.commands.train_options import (
    add_model_and_output_arguments,
    base_model_config,
    engine_config_from_args,
)
from samplers.commands.validation import (
    OptionError,
    add_device_argument,
    check_checkpoint_file,
    check_model_folder,
    dataclass_overrides,
    float_range,
    image_file,
    input_file,
    int_range,
    non_negative_int,
    output_file,
    parse_assignments,
    positive_float,
    positive_int,
    print_note,
    probability,
    resolve_device,
)

DEFAULT_CONFIG = "tiny"
TOY_FPS = 25.0
TOY_SAMPLE_RATE = 16000


# ---- train ----

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from avatar_models.lookahead import LookaheadConfig, LookaheadTrainConfig
    from avatar_models.training.engine import EngineConfig

    d = LookaheadTrainConfig()
    parser.add_argument("--stage", choices=("base", "lookahead"), required=True,
                        help="base: audio-driven DiT with the reference at temporal index 0 "
                             "(also the baseline fine-tune); lookahead: flexible keyframe "
                             "position l ~ U[0, n-1+d_max] (Eq. 7)")
    anchor = parser.add_mutually_exclusive_group()
    anchor.add_argument("--fixed-anchor", dest="anchor", action="store_const", const="fixed",
                        help="Table 5 ablation: keyframe always at l = n-1+d (Eq. 6; the "
                             "paper's Table 5 text says n+d)")
    anchor.add_argument("--past-time", dest="anchor", action="store_const", const="past",
                        help="Table 4 arm: keyframe before the window, l ~ U[-past_max, -1]")
    parser.set_defaults(anchor="uniform")
    parser.add_argument("--d-max", type=non_negative_int, default=d.d_max,
                        help="largest keyframe distance trained, in latent frames")
    parser.add_argument("--distance", type=non_negative_int, default=d.distance,
                        help="D in video frames: --fixed-anchor's distance, and the inference "
                             "distance recorded as the sampling default (warns when floor(D/r) "
                             "> d_max)")
    parser.add_argument("--past-max", type=positive_int, default=d.past_max,
                        help="--past-time: farthest past offset in latent frames")
    parser.add_argument("--starting-frames", type=non_negative_int, default=d.starting_frames,
                        help="s, clean frames from the previous segment")
    parser.add_argument("--no-start-prob", type=probability, default=d.no_start_prob,
                        help="share of batches without starting frames (segment 0)")
    parser.add_argument("--audio-drop", type=probability, default=d.audio_drop,
                        help="probability of dropping the audio (classifier-free guidance)")
    parser.add_argument("--init", type=input_file("a checkpoint", (".safetensors",)),
                        help="start from this lookahead checkpoint's weights (fine-tuning; its "
                             "model config is used)")
    src = parser.add_argument_group("data")
    src.add_argument("--dataset", metavar="MODULE:FACTORY",
                     help="Python factory returning samples in the LookaheadFaces layout "
                          "(default: the procedural toy faces)")
    src.add_argument("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="keyword argument for the --dataset factory (repeatable)")
    # Defaults chosen for the toy (the paper gives batch 8 and no other recipe): docs/lookahead.md
    add_model_and_output_arguments(
        parser, config_class=LookaheadConfig, default_config=DEFAULT_CONFIG,
        engine_defaults=EngineConfig(steps=1000, batch_size=8, lr=1e-4, ema_decay=0.999,
                                     grad_clip=1.0), set_example="objective=v")


def validate_train_args(args: argparse.Namespace):
    """Every check that needs no model: returns (model config, train config, init metadata)."""
    from avatar_models.lookahead import (
        LookaheadConfig,
        LookaheadTrainConfig,
        check_distance,
        latent_distance,
    )

    args.device = str(resolve_device(args.device))
    base, init_meta = base_model_config(args, "lookahead", LookaheadConfig, DEFAULT_CONFIG)
    overrides = dataclass_overrides(LookaheadConfig, args.set, "--set", defaults=base)
    try:
        cfg = LookaheadConfig.from_dict({**base, **overrides})
        train = LookaheadTrainConfig(
            stage=args.stage, anchor=args.anchor, d_max=args.d_max, distance=args.distance,
            past_max=args.past_max, starting_frames=args.starting_frames,
            no_start_prob=args.no_start_prob, audio_drop=args.audio_drop)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if args.anchor != "uniform" and args.stage != "lookahead":
        raise OptionError(f"--{'fixed-anchor' if args.anchor == 'fixed' else 'past-time'} "
                          f"places the keyframe in time: it needs --stage lookahead")
    if cfg.start_mode == "replace" and train.starting_frames >= cfg.frames:
        raise OptionError(f"--starting-frames {train.starting_frames}: token replacement needs "
                          f"s < n = {cfg.frames} (the window's latent frames)")
    if args.stage == "lookahead" and args.anchor == "uniform":
        check_distance(latent_distance(args.distance, cfg.vae_temporal_ratio), args.d_max,
                       "--distance")
    if args.stage == "lookahead" and args.init is None:
        print_note("--stage lookahead without --init trains from scratch; the paper fine-tunes "
                   "a base model (train one with --stage base first)")
    if args.dataset is not None:
        from samplers.commands.anchored import find_function

        find_function(args.dataset, "--dataset")
        parse_assignments(args.dataset_arg, "--dataset-arg")
    elif cfg.in_channels != 3 or cfg.vae_temporal_ratio != 1 or \
            cfg.input_height != cfg.input_width:
        raise OptionError(f"the toy data is square RGB pixels with r = 1; config "
                          f"{cfg.name!r} has in_channels={cfg.in_channels}, r="
                          f"{cfg.vae_temporal_ratio}, {cfg.input_height}x{cfg.input_width}: "
                          f"pass --dataset MODULE:FACTORY for it")
    return cfg, train, init_meta


def build_dataset(args: argparse.Namespace, cfg, train):
    from avatar_models.lookahead import LookaheadFaces

    if args.dataset is None:
        data = {"kind": "toy", "fps": TOY_FPS, "sample_rate": TOY_SAMPLE_RATE,
                "audio": "energy"}
        return LookaheadFaces(frames=cfg.frames, d_max=train.ahead_frames(cfg),
                              past=train.past_frames(cfg), size=cfg.input_height,
                              bands=cfg.audio_dim, fps=TOY_FPS, seed=args.seed), data
    from samplers.commands.anchored import find_function

    kwargs = parse_assignments(args.dataset_arg, "--dataset-arg")
    factory = find_function(args.dataset, "--dataset")
    return factory(**kwargs), {"kind": args.dataset, "audio": kwargs.get("audio", "wav2vec"),
                               "fps": kwargs.get("fps", TOY_FPS)}


def run_train(args: argparse.Namespace) -> int:
    from avatar_models.lookahead import LookaheadDiT, lookahead_system
    from avatar_models.training.distributed import teardown_world
    from avatar_models.training.engine import train

    cfg, tcfg, init_meta = validate_train_args(args)
    dataset, data = build_dataset(args, cfg, tcfg)
    torch.manual_seed(args.seed)
    model = LookaheadDiT(cfg, attention_backend=args.attention_backend)
    if args.init is not None:
        from avatar_models.checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(args.init, system="lookahead").weights("ema"))
    params = sum(p.numel() for p in model.parameters())
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"training lookahead --stage {tcfg.stage} ({tcfg.anchor}) {cfg.name} "
              f"({params / 1e6:.2f}M parameters): {cfg}")
    extra = {"data": data, "init": None if args.init is None else str(args.init)}
    engine_cfg = engine_config_from_args(args)
    try:
        train(lookahead_system(model, dataset, tcfg, extra), engine_cfg, out=args.out,
              resume=args.resume)
    finally:
        teardown_world()
    return 0


# ---- sample ----

def _keyframe_entry(text: str) -> tuple[float, Path]:
    time_s, sep, path = text.partition("=")
    try:
        t = float(time_s)
    except ValueError:
        t = -1.0
    if not sep or t < 0:
        raise argparse.ArgumentTypeError(f"expected TIME_S=IMAGE with TIME_S >= 0, got {text!r}")
    return t, image_file(path)


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a `train lookahead` checkpoint (.safetensors)")
    parser.add_argument("--reference", type=image_file, required=True,
                        help="reference image (the keyframe under self-keyframing)")
    parser.add_argument("--audio", type=input_file("an audio or video file"), required=True,
                        help="driving speech (any file with an audio track)")
    parser.add_argument("--out", type=output_file(".mp4"), required=True, help="output .mp4")
    parser.add_argument("--distance", type=non_negative_int, default=None,
                        help="D, video frames between the window's last frame and the keyframe "
                             "(default: the checkpoint's --distance)")
    parser.add_argument("--mode", choices=("lookahead", "reference", "past"), default=None,
                        help="keyframe placement (default: lookahead for a lookahead checkpoint, "
                             "reference (index 0) for a base one)")
    parser.add_argument("--keyframe", type=_keyframe_entry, action="append", default=[],
                        metavar="TIME_S=IMAGE",
                        help="narrative keyframe from TIME_S on (repeatable), looked up at the "
                             "anchor's time")
    parser.add_argument("--starting-frames", type=non_negative_int, default=None,
                        help="s (default: the checkpoint's)")
    parser.add_argument("--steps", type=positive_int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float_range(0.0), default=1.0,
                        help="audio classifier-free guidance scale (1: off)")
    parser.add_argument("--fps", type=positive_float, default=None,
                        help="video frame rate (default: the checkpoint's data fps)")
    parser.add_argument("--max-seconds", type=positive_float, default=None,
                        help="stop after this much audio")
    parser.add_argument("--vae", type=Path, default=None, help="FrameVAE folder (latent models)")
    parser.add_argument("--wav2vec", type=Path, default=None,
                        help="Wav2Vec2 folder (checkpoints trained on wav2vec features)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="EMA or raw weights")
    parser.add_argument("--fragmented", action="store_true",
                        help="fragmented mp4: playable even after a hard kill (audio then "
                             "carries the AAC priming samples)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    add_device_argument(parser)
    parser.add_argument("--attention-backend", choices=("ref", "triton", "cuda"), default=None,
                        help="force one attention backend")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def validate_sample_args(args: argparse.Namespace) -> dict:
    """Every check that needs no model: returns the checkpoint metadata; fills the defaults
    the checkpoint records (distance, s, fps, mode)."""
    from avatar_models.lookahead import LookaheadConfig

    args.device = resolve_device(args.device)
    meta = check_checkpoint_file(args.checkpoint, "--checkpoint", "lookahead")
    try:
        cfg = LookaheadConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise OptionError(f"--checkpoint {str(args.checkpoint)!r}: bad model config: {exc}") \
            from None
    train = meta["extra"].get("train", {})
    data = meta["extra"].get("data", {})
    args.distance = train.get("distance", 12) if args.distance is None else args.distance
    args.starting_frames = (train.get("starting_frames", 1) if args.starting_frames is None
                            else args.starting_frames)
    args.fps = args.fps or float(data.get("fps", TOY_FPS))
    if args.mode is None:
        args.mode = "reference" if train.get("stage") == "base" else (
            "past" if train.get("anchor") == "past" else "lookahead")
    if cfg.start_mode == "replace" and args.starting_frames >= cfg.frames:
        raise OptionError(f"--starting-frames {args.starting_frames}: token replacement needs "
                          f"s < n = {cfg.frames}")
    if cfg.vae_temporal_ratio != 1:
        raise OptionError(f"--checkpoint: the model works on latents with VAE temporal ratio "
                          f"r={cfg.vae_temporal_ratio}, which needs a video VAE; the project's "
                          f"codecs (pixels, FrameVAE) have r = 1")
    if cfg.input_height != cfg.input_width:
        raise OptionError(f"--checkpoint: sampling takes square frames, the model's are "
                          f"{cfg.input_height}x{cfg.input_width}")
    if cfg.in_channels != 3 or meta["extra"].get("vae"):
        if args.vae is None:
            raise OptionError("this checkpoint works on VAE latents: pass --vae DIR")
        check_model_folder(args.vae, "--vae", "vae")
    if data.get("audio", "energy") == "wav2vec":
        if args.wav2vec is None:
            raise OptionError("this checkpoint was trained on wav2vec features: pass "
                              "--wav2vec DIR")
        if not (args.wav2vec / "config.json").is_file():
            raise OptionError(f"--wav2vec {str(args.wav2vec)!r}: expected a transformers "
                              f"Wav2Vec2Model folder with config.json")
    from avatar_models.media import video_info

    if args.audio.suffix.lower() in (".mp4", ".mov", ".mkv", ".webm") and \
            not video_info(args.audio).has_audio:
        raise OptionError(f"--audio {str(args.audio)!r} has no audio track")
    times = [t for t, _ in args.keyframe]
    if len(set(times)) != len(times):
        raise OptionError(f"--keyframe times must differ, got {sorted(times)}")
    return meta


def _image_latent(path: Path, cfg, vae, device) -> torch.Tensor:
    """An image file -> the model's frame [C, H, W]: centre square crop, resize, [-1, 1], and
    with a VAE encoded as a single image (as the training keyframe is)."""
    from avatar_models.media import read_image
    from samplers.commands.anchored import resize_frames, square_crop

    image, _ = square_crop(read_image(path))
    factor = 1 if vae is None else vae.downsample_factor
    frame = resize_frames(image, cfg.input_height * factor)              # [3, S, S]
    if vae is None:
        return frame
    return vae.encode(frame[None, None].to(device, vae.dtype))[0, 0].float()  # [C, H, W]


def run_sample(args: argparse.Namespace) -> int:
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.data.speech import energy_features
    from avatar_models.lookahead import LookaheadConfig, LookaheadDiT, NoiseSchedule
    from avatar_models.media import read_audio, to_uint8_frames
    from samplers.lookahead import (
        LookaheadSettings,
        StreamingMp4,
        frames_for_audio,
        lookahead_sample,
    )

    meta = validate_sample_args(args)
    cfg = LookaheadConfig.from_dict(meta["config"])
    data = meta["extra"].get("data", {})
    rate = int(data.get("sample_rate", TOY_SAMPLE_RATE))
    wave, rate = read_audio(args.audio, sample_rate=rate,
                            end=args.max_seconds)                        # [1, S]
    wave = wave[0]
    total = frames_for_audio(wave.shape[0] / rate, args.fps, cfg.vae_temporal_ratio)
    if data.get("audio", "energy") == "wav2vec":
        from avatar_models.conditioning import AudioEncoder

        encoder = AudioEncoder.from_pretrained(args.wav2vec, device=args.device)
        feats = encoder.encode(wave, rate, fps=args.fps, num_frames=total).float().cpu()
    else:
        feats = energy_features(wave, rate, args.fps, total, cfg.audio_dim)
    vae = decode = None
    if cfg.in_channels != 3:
        from avatar_models.conditioning import FrameVAE

        vae = FrameVAE.from_pretrained(args.vae, device=args.device)
        decode = lambda z: vae.decode(z[None].to(vae.dtype))[0].float()  # noqa: E731
    schedule_images = sorted(args.keyframe)
    if not any(t == 0.0 for t, _ in args.keyframe):
        schedule_images = [(0.0, args.reference), *schedule_images]
    keyframes = [(t, _image_latent(p, cfg, vae, args.device)) for t, p in schedule_images]
    ckpt = load_checkpoint(args.checkpoint, system="lookahead")
    model = LookaheadDiT(cfg, attention_backend=args.attention_backend)
    model.load_state_dict(ckpt.weights(args.weights))
    model = model.to(args.device).eval()
    train = meta["extra"].get("train", {})
    settings = LookaheadSettings(distance=args.distance, starting_frames=args.starting_frames,
                                 steps=args.steps, guidance=args.guidance, mode=args.mode,
                                 d_max=train.get("d_max"))
    samples_per_frame = rate / args.fps

    with StreamingMp4(args.out, args.fps, sample_rate=rate, fragmented=args.fragmented) as out:
        def write(frames: torch.Tensor, first: int) -> None:
            a = int(round(first * samples_per_frame))
            b = int(round((first + frames.shape[0]) * samples_per_frame))
            chunk = torch.nn.functional.pad(wave[a:b], (0, max(0, b - a - wave[a:b].shape[0])))
            out.write(to_uint8_frames(frames.clamp(-1, 1)), chunk)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            written = lookahead_sample(
                model, NoiseSchedule(cfg.objective), total_frames=total, window=cfg.frames,
                latent_shape=(cfg.in_channels, cfg.input_height, cfg.input_width), audio=feats,
                keyframes=keyframes, fps=args.fps, settings=settings,
                ratio=cfg.vae_temporal_ratio, start_mode=cfg.start_mode, decode=decode,
                writer=write, generator=torch.Generator().manual_seed(args.seed),
                device=args.device, progress=not args.no_progress)
    print(f"wrote {args.out} ({written} frames, {args.fps:g} fps, keyframe {args.mode} "
          f"D={args.distance})")
    return 0


# ---- demo ----

def _distances(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame counts >= 0, got "
                                         f"{text!r}")
    return values


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from samplers.demo.lookahead_demo import LookaheadDemoOptions

    d = LookaheadDemoOptions()
    parser.add_argument("--out", type=Path, default=Path("out/lookahead"), help="output folder")
    parser.add_argument("--lookahead", type=Path, default=d.lookahead,
                        help="lookahead fine-tune checkpoint")
    parser.add_argument("--baseline", type=Path, default=d.baseline,
                        help="baseline fine-tune checkpoint (reference conditioning)")
    parser.add_argument("--base", type=Path, default=d.base,
                        help="base (pretrained) checkpoint for the Fig. 3 pilot")
    parser.add_argument("--identities", type=int_range(2), default=d.identities,
                        help="held-out identities (intervals over them)")
    parser.add_argument("--segments", type=int_range(2), default=d.segments,
                        help="segments of the drift run")
    parser.add_argument("--sweep-segments", type=int_range(3), default=d.sweep_segments,
                        help="segments per video of the Fig. 6 sweep and the swap check")
    parser.add_argument("--distances", type=_distances, default=d.distances,
                        help="the Fig. 6 sweep's D values (read off the figure)")
    parser.add_argument("--distance", type=non_negative_int, default=None,
                        help="D of the drift run (default: the checkpoint's)")
    parser.add_argument("--steps", type=positive_int, default=d.steps, help="denoising steps")
    parser.add_argument("--no-sweep", action="store_true", help="skip the Fig. 6 sweep")
    parser.add_argument("--full", action="store_true",
                        help="the sweep at the drift run's length (slower)")
    parser.add_argument("--seed", type=int, default=d.seed, help="noise seed")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_demo(args: argparse.Namespace) -> int:
    from samplers.demo.lookahead_demo import (
        LookaheadDemoOptions,
        format_report,
        run_lookahead_demo,
    )

    for name in ("lookahead", "baseline", "base"):
        path = getattr(args, name)
        if not path.is_file():
            raise FileNotFoundError(f"--{name} {str(path)!r}: checkpoint not found (run `make "
                                    f"train-lookahead`, or pass --{name})")
        check_checkpoint_file(path, f"--{name}", "lookahead")
    opts = LookaheadDemoOptions(
        lookahead=args.lookahead, baseline=args.baseline, base=args.base,
        identities=args.identities, segments=args.segments,
        sweep_segments=args.segments if args.full else args.sweep_segments,
        distances=args.distances, distance=args.distance, steps=args.steps,
        sweep=not args.no_sweep, seed=args.seed, device=str(resolve_device(args.device)),
        progress=not args.no_progress)
    paths = run_lookahead_demo(opts, args.out)
    result = json.loads(paths["metrics"].read_text())
    print(format_report(result))
    print(f"\ndemo done in {opts.timings['total_seconds']:.0f} s; wrote:")
    for name, path in paths.items():
        print(f"  {name:12s} {path}")
    return 0

"""MCDM's ``avatar-kernels`` verbs: ``train`` (stages 0 to 3) and ``sample``.

``samplers/cli.py`` finds this module through its SYSTEMS table.

    avatar-kernels train mcdm --stage 0 --config tiny --out s0.safetensors
    avatar-kernels train mcdm --stage 1 --init s0.safetensors --out s1.safetensors \\
        [--sd15 SD_DIR]
    avatar-kernels train mcdm --stage 2 --init s1.safetensors --out s2.safetensors
    avatar-kernels train mcdm --stage 3 --init s2.safetensors --out s3.safetensors
    avatar-kernels sample mcdm --checkpoint s3.safetensors --reference face.png \\
        --audio speech.wav [--frames 7200] [--landmarks lm.npy] --out out.mp4

Each stage after 0 starts from the previous stage's checkpoint (``--init``, checked to be a stage
s - 1 run) and trains exactly the modules of :data:`avatar_models.mcdm.STAGE_TABLE`. Training data
is the toy world (:class:`avatar_models.mcdm.MCDMFaces`: procedural faces, pixels as latents,
energy-envelope audio of a waveform driven by the true mouth opening, colour-layout image
embedding, 20 landmarks). Pixels are the latents of the ``tiny`` toys (``in_channels = 3``);
a latent model trains on the latents of a codec chosen at stage 0 (``--codec`` patch-PCA file,
the VAE stand-in, or ``--vae`` AutoencoderKL folder), recorded in every stage's checkpoint;
``sample`` encodes the reference and decodes the frames with it.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import torch

from samplers.commands.train_options import (
    add_model_and_output_arguments,
    engine_config_from_args,
)
from samplers.commands.validation import (
    OptionError,
    add_device_argument,
    check_checkpoint_file,
    check_model_folder,
    check_sd15_folder_option,
    dataclass_overrides,
    float_range,
    image_file,
    input_file,
    int_range,
    output_file,
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
    from avatar_models.mcdm import MCDMConfig, MCDMTrainConfig
    from avatar_models.training.engine import EngineConfig

    d = MCDMTrainConfig()
    parser.add_argument("--stage", type=int_range(0, 3), required=True,
                        help="0: lip/expression encoders; 1: archived-clip prior; 2: "
                             "present-clip prior; 3: present-clip attention + temporal layer")
    parser.add_argument("--init", type=input_file("a checkpoint", (".safetensors",)),
                        help="the previous stage's checkpoint (required for stages 1-3)")
    parser.add_argument("--init-weights", choices=("ema", "model"), default="ema",
                        help="which weights of --init to start from")
    parser.add_argument("--landmark-drop", type=probability, default=d.landmark_drop,
                        help="stage 2: probability of dropping the whole landmark clip")
    codec = parser.add_mutually_exclusive_group()
    codec.add_argument("--codec", type=input_file("a patch-PCA codec", (".safetensors",)),
                       help="stage 0: train on the latents of this patch-PCA codec (the VAE "
                            "stand-in, avatar_models.data.patch_pca; e.g. the one `train "
                            "warpface` fits); later stages use --init's codec")
    codec.add_argument("--vae", type=Path, default=None,
                       help="stage 0: train on the latents of this diffusers AutoencoderKL "
                            "folder (e.g. SD's vae/; toy frames are resized to latent_size x "
                            "its factor); later stages use --init's")
    parser.add_argument("--wav2vec", type=Path, default=None,
                        help="stage 0: audio features from this local Wav2Vec2Model folder "
                             "(hidden size = audio_dim) instead of the toy's energy features; "
                             "later stages and sample use --init's")
    parser.add_argument("--clip", type=Path, default=None,
                        help="stage 0: image embedding from this local CLIPModel folder "
                             "(projection_dim = image_dim) instead of the toy's colour layout; "
                             "later stages and sample use --init's")
    # toy recipe (chosen): the paper's lr 1e-5 / batch 4 / 30k steps is too slow for a CPU toy
    m, _ = add_model_and_output_arguments(
        parser, config_class=MCDMConfig, default_config=DEFAULT_CONFIG,
        engine_defaults=EngineConfig(steps=500, batch_size=4, lr=1e-4, ema_decay=0.999,
                                     grad_clip=1.0),
        set_example="memory_alpha=0.5 (with --init: only fields that keep the weights' shapes)")
    m.add_argument("--temporal", choices=("performer", "softmax"), default=None,
                   help="temporal layer's attention: performer (MTA) or softmax (Table 7's "
                        "Vanilla) (default: the config's / --init's)")
    m.add_argument("--no-memory", action="store_true",
                   help="w/o-MTA ablation (Table 4): F_ac^ref + F_pc^ref, no memory")
    m.add_argument("--memory-alpha", type=float_range(0.0, 1.0), default=None,
                   help="alpha of the memory update (Eq. 5; default: the config's, 0.1)")
    m.add_argument("--sd15", type=Path, default=None,
                   help="stage 1: start the denoiser from a local Stable Diffusion 1.5 folder "
                        "(its unet/, diffusers UNet2DConditionModel weights; nothing "
                        "downloads); needs a config with unet_layout='sd15' and SD's shapes, "
                        "e.g. paper (docs/mcdm.md, 'SD1.5 weights')")


def validate_train_args(args: argparse.Namespace):
    """Every check that needs no model: returns (model config, train config, init metadata)."""
    from avatar_models.mcdm import NAMED_CONFIGS, MCDMConfig, MCDMTrainConfig

    args.device = str(resolve_device(args.device))
    init_meta = None
    if args.stage == 0:
        if args.init is not None:
            raise OptionError("--stage 0 trains from scratch; drop --init")
        name = args.config or DEFAULT_CONFIG
        base = {**NAMED_CONFIGS[name], "name": name}
    else:
        if args.init is None:
            raise OptionError(f"--stage {args.stage} starts from the stage {args.stage - 1} "
                              f"checkpoint: pass --init FILE")
        if args.config is not None:
            raise OptionError("--init fixes the model config; drop --config")
        init_meta = check_checkpoint_file(args.init, "--init", "mcdm")
        got = init_meta["extra"].get("train", {}).get("stage")
        if got != args.stage - 1:
            raise OptionError(f"--init {str(args.init)!r} is a stage {got} checkpoint; --stage "
                              f"{args.stage} starts from stage {args.stage - 1}")
        base = init_meta["config"]
    overrides = dataclass_overrides(MCDMConfig, args.set, "--set", defaults=base)
    switches = {"temporal": args.temporal, "memory_alpha": args.memory_alpha,
                "memory": False if args.no_memory else None}
    overrides.update({k: v for k, v in switches.items() if v is not None})
    try:
        cfg = MCDMConfig.from_dict({**base, **overrides})
        train = MCDMTrainConfig(stage=args.stage, landmark_drop=args.landmark_drop)
    except (TypeError, ValueError) as exc:
        raise OptionError(str(exc)) from None
    if init_meta is not None:
        given = [o for o, v in (("--codec", args.codec), ("--vae", args.vae),
                                ("--wav2vec", args.wav2vec), ("--clip", args.clip)) if v]
        if given:
            raise OptionError(f"{' / '.join(given)} are chosen at stage 0; --stage "
                              f"{args.stage} uses --init's (drop them)")
        args.codec_source = recorded_codec(args.init, init_meta["extra"])
        args.encoders = recorded_encoders(init_meta["extra"])
    else:
        args.codec_source = (("patch-pca", args.codec) if args.codec is not None
                             else ("vae", args.vae) if args.vae is not None else None)
        args.encoders = {"wav2vec": args.wav2vec, "clip": args.clip}
    option = "--init's codec" if init_meta is not None else "--codec / --vae"
    pixels = check_codec(args.codec_source, cfg, option)
    check_encoders(args.encoders, cfg, "--init's" if init_meta is not None else "")
    from avatar_models.data.procedural_faces import SIZE

    if SIZE % pixels and pixels % SIZE:
        raise OptionError(f"the toy frames are {SIZE} px: the model's frames (latent_size "
                          f"{cfg.latent_size} x the codec's factor = {pixels} px) must divide "
                          f"{SIZE} or be a multiple of it")
    if args.sd15 is not None:
        from avatar_models.mcdm_sd15 import check_sd15_config

        if args.stage != 1:
            raise OptionError(f"--sd15 sets the denoiser's starting weights, which stage 1 "
                              f"trains (later stages inherit them through --init); got "
                              f"--stage {args.stage}")
        check_sd15_folder_option(args.sd15, lambda sd_config, where: check_sd15_config(
            cfg, sd_config, where))
    return cfg, train, init_meta


def run_train(args: argparse.Namespace) -> int:
    from avatar_models.mcdm import MCDM, STAGE_KEYS, MCDMFaces, mcdm_system
    from avatar_models.training.distributed import teardown_world
    from avatar_models.training.engine import train

    cfg, tcfg, _ = validate_train_args(args)
    codec = load_codec(args.codec_source, args.device)
    # only the stages whose loss reads audio and image run the encoders on every item
    audio_features = image_embedding = None
    if "audio" in STAGE_KEYS[tcfg.stage]:
        audio_features, image_embedding = load_encoders(args.encoders, args.device)
    dataset = MCDMFaces(frames=cfg.clip_frames, archived=cfg.archived_frames,
                        size=cfg.latent_size * (1 if codec is None else codec.patch),
                        bands=cfg.audio_dim, fps=TOY_FPS, seed=args.seed, codec=codec,
                        audio_features=audio_features, image_embedding=image_embedding)
    torch.manual_seed(args.seed)
    model = MCDM(cfg, attention_backend=args.attention_backend)
    if args.init is not None:
        from avatar_models.checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(args.init, system="mcdm")
                              .weights(args.init_weights))
    sd15 = None
    if args.sd15 is not None:
        from avatar_models.mcdm_sd15 import load_sd15_denoiser

        sd15 = load_sd15_denoiser(model, args.sd15)
        if int(os.environ.get("RANK", "0")) == 0:
            print_note(f"loaded {sd15['loaded']} SD1.5 tensors from {sd15['folder']} into the "
                       f"denoiser ({sd15['zeroed']} biases SD lacks set to 0, "
                       f"{sd15['kept_init']} tensors without an SD counterpart kept, "
                       f"{len(sd15['sd_unused'])} SD text cross-attention tensors unused)")
    if int(os.environ.get("RANK", "0")) == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"training mcdm --stage {tcfg.stage} {cfg.name} ({params / 1e6:.2f}M "
              f"parameters)")
    data = {"kind": "toy", "fps": TOY_FPS, "sample_rate": TOY_SAMPLE_RATE,
            "audio": "energy" if args.encoders["wav2vec"] is None else "wav2vec",
            "image": "colour-layout" if args.encoders["clip"] is None else "clip"}
    extra = {"data": data, "init": None if args.init is None else str(args.init),
             "sd15": None if sd15 is None else sd15["folder"], "sd15_load": sd15,
             **codec_record(args.codec_source, args.out),
             **{k: str(Path(v).resolve()) for k, v in args.encoders.items() if v is not None}}
    # the paper's learning rate is fixed (section 4.1): no decay
    engine_cfg = engine_config_from_args(args, min_lr_ratio=1.0)
    try:
        train(mcdm_system(model, dataset, tcfg, lr=args.lr, extra=extra), engine_cfg,
              out=args.out, resume=args.resume)
    finally:
        teardown_world()
    return 0


# ---- latent codec (train and sample) ----

def recorded_codec(checkpoint: Path, extra: dict) -> tuple[str, Path] | None:
    """The codec a checkpoint was trained with: ("patch-pca", file) (recorded relative to the
    checkpoint), ("vae", folder), or None (pixels as latents)."""
    from samplers.commands.anchored import sample_codec

    pca = sample_codec(checkpoint, extra)
    if pca is not None:
        return "patch-pca", pca
    return None if not extra.get("vae") else ("vae", Path(extra["vae"]))


def check_codec(codec: tuple[str, Path] | None, cfg, option: str) -> int:
    """Check a codec against the model config (FileNotFoundError / OptionError naming
    ``option``); returns the frame size in pixels (latent_size x the codec's factor)."""
    import json

    from samplers.commands.anchored import check_codec_file

    if codec is None:
        if cfg.in_channels != 3:
            raise OptionError(f"config {cfg.name!r} works on {cfg.in_channels}-channel latents: "
                              f"give a codec (--codec FILE or --vae DIR at stage 0)")
        return cfg.latent_size
    kind, path = codec
    if kind == "patch-pca":
        check_codec_file(path, option)
        from avatar_models.data.patch_pca import PatchPCA

        pca = PatchPCA.load(path)
        channels, factor = pca.channels, pca.patch
    else:
        folder = check_model_folder(path, option, "vae")
        vae_cfg = json.loads((folder / "config.json").read_text())
        channels = vae_cfg.get("latent_channels")
        factor = 2 ** (len(vae_cfg.get("block_out_channels", (0,))) - 1)
    if channels != cfg.in_channels:
        raise OptionError(f"{option} {str(path)!r} gives {channels} latent channels, the model "
                          f"takes in_channels={cfg.in_channels}")
    return cfg.latent_size * factor


def recorded_encoders(extra: dict) -> dict:
    """The Wav2Vec2 / CLIP folders a checkpoint was trained with (None: the toy's stand-ins)."""
    return {k: None if not extra.get(k) else Path(extra[k]) for k in ("wav2vec", "clip")}


def check_encoders(encoders: dict, cfg, source: str) -> None:
    """The audio and image encoders against the config (their widths), and what has no encoder
    here against the toy's stand-ins: the image embedding (colour layout, 48) without CLIP and
    the landmarks (20 points; no 68-point detector is wired). OptionError / FileNotFoundError
    naming the option (``source``: "--init's", "--checkpoint's" or "" for the options)."""
    import json

    from avatar_models.data import procedural_faces as pf

    for name, kind, field, key in (("wav2vec", "wav2vec2", "audio_dim", "hidden_size"),
                                   ("clip", "clip", "image_dim", "projection_dim")):
        if encoders[name] is None:
            continue
        option = f"{source} --{name}".strip()
        folder = check_model_folder(encoders[name], option, kind)
        width = json.loads((folder / "config.json").read_text()).get(key)
        if width != getattr(cfg, field):
            raise OptionError(f"{option} {str(folder)!r} gives {key}={width}, the model takes "
                              f"{field}={getattr(cfg, field)}")
    stand_ins = [("landmark_points", pf.N_LANDMARKS, "landmarks")]
    if encoders["clip"] is None:
        stand_ins.append(("image_dim", pf.IDENTITY_DIM, "colour-layout image embedding; or "
                                                        "--clip DIR at stage 0"))
    for field, toy, what in stand_ins:
        if getattr(cfg, field) != toy:
            raise OptionError(f"config {cfg.name!r} has {field}={getattr(cfg, field)}; the toy "
                              f"gives {toy} ({what})")


def load_encoders(encoders: dict, device):
    """(audio_features, image_embedding) callables for :class:`avatar_models.mcdm.MCDMFaces`
    from the Wav2Vec2 / CLIP folders (None where the toy's stand-in is used)."""
    audio_features = image_embedding = None
    if encoders["wav2vec"] is not None:
        from avatar_models.conditioning import AudioEncoder

        wav2vec = AudioEncoder.from_pretrained(encoders["wav2vec"], device=device)

        def audio_features(wave, sample_rate, fps, frames):
            with torch.no_grad():
                return wav2vec.encode(wave, sample_rate, fps=fps, num_frames=frames).float().cpu()
    if encoders["clip"] is not None:
        from avatar_models.conditioning import CLIPEncoder

        clip = CLIPEncoder.from_pretrained(encoders["clip"], device=device)

        def image_embedding(frame):                                   # [3, H, W] in [0, 1]
            with torch.no_grad():
                return clip.encode_images(frame * 2 - 1)[0].float().cpu()
    return audio_features, image_embedding


def load_codec(codec: tuple[str, Path] | None, device):
    """The codec object (``encode`` / ``decode`` / ``patch``), or None for pixel models."""
    if codec is None:
        return None
    kind, path = codec
    if kind == "patch-pca":
        from avatar_models.data.patch_pca import PatchPCA

        return PatchPCA.load(path)
    from avatar_models.conditioning import FrameVAE, VAECodec

    return VAECodec(FrameVAE.from_pretrained(path, device=device))


def codec_record(codec: tuple[str, Path] | None, checkpoint: Path) -> dict:
    """The checkpoint's ``extra`` entries for a codec (what :func:`recorded_codec` reads)."""
    from samplers.commands.anchored import codec_entry

    if codec is None:
        return {}
    kind, path = codec
    if kind == "patch-pca":
        return {"codec": codec_entry(path, checkpoint)}
    return {"vae": str(Path(path).resolve())}


# ---- sample ----

def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a `train mcdm` checkpoint (.safetensors), normally stage 3")
    parser.add_argument("--reference", type=image_file, required=True, help="reference image")
    parser.add_argument("--audio", type=input_file("an audio or video file"), required=True,
                        help="driving speech (any file with an audio track)")
    parser.add_argument("--out", type=output_file(".mp4"), required=True, help="output .mp4")
    parser.add_argument("--frames", type=positive_int, default=None,
                        help="frames to generate (default: the audio's length; audio past its "
                             "end is silence)")
    parser.add_argument("--landmarks", type=input_file("a .npy file", (".npy",)), default=None,
                        help="optional per-frame landmarks [T, 2P] in [-1, 1] (default: none, "
                             "the paper's default); the last row holds past T")
    parser.add_argument("--steps", type=positive_int, default=25, help="video DDIM steps (chosen)")
    parser.add_argument("--prior-steps", type=positive_int, default=25,
                        help="motion-prior DDIM steps (chosen)")
    parser.add_argument("--fps", type=positive_float, default=None,
                        help="video frame rate (default: the checkpoint's data fps)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="EMA or raw weights")
    parser.add_argument("--vae", type=Path, default=None,
                        help="the AutoencoderKL folder of a checkpoint trained with --vae, when "
                             "it is no longer where the checkpoint records it")
    parser.add_argument("--wav2vec", type=Path, default=None,
                        help="the Wav2Vec2 folder of a checkpoint trained with --wav2vec, when "
                             "it is no longer where the checkpoint records it")
    parser.add_argument("--clip", type=Path, default=None,
                        help="the CLIP folder of a checkpoint trained with --clip, when it is no "
                             "longer where the checkpoint records it")
    parser.add_argument("--fragmented", action="store_true",
                        help="fragmented mp4: playable even after a hard kill")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    add_device_argument(parser)
    parser.add_argument("--attention-backend", choices=("ref", "triton", "cuda"), default=None,
                        help="force one attention backend")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def validate_sample_args(args: argparse.Namespace) -> dict:
    """Every check that needs no model: returns the checkpoint metadata (landmarks loaded into
    ``args.landmark_rows``)."""
    import numpy as np

    from avatar_models.mcdm import MCDMConfig

    args.device = resolve_device(args.device)
    meta = check_checkpoint_file(args.checkpoint, "--checkpoint", "mcdm")
    try:
        cfg = MCDMConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise OptionError(f"--checkpoint {str(args.checkpoint)!r}: bad model config: {exc}") \
            from None
    stage = meta["extra"].get("train", {}).get("stage")
    if stage not in (1, 2, 3):
        raise OptionError(f"--checkpoint {str(args.checkpoint)!r} is a stage {stage} "
                          f"checkpoint; sampling needs the denoiser (stage 3, or 1-2 for "
                          f"diagnostics)")
    codec = recorded_codec(args.checkpoint, meta["extra"])
    if args.vae is not None:
        if codec is None or codec[0] != "vae":
            raise OptionError(f"--vae: --checkpoint {str(args.checkpoint)!r} was not trained on "
                              f"VAE latents ({'pixels' if codec is None else codec[0]}); drop "
                              f"--vae")
        codec = ("vae", args.vae)
    args.codec_source = codec
    args.frame_size = check_codec(codec, cfg, "--vae" if args.vae is not None
                                  else "the codec of --checkpoint")
    args.encoders = recorded_encoders(meta["extra"])
    for name in ("wav2vec", "clip"):
        override = getattr(args, name)
        if override is not None:
            if args.encoders[name] is None:
                raise OptionError(f"--{name}: --checkpoint {str(args.checkpoint)!r} was not "
                                  f"trained with --{name}; drop it")
            args.encoders[name] = override
    check_encoders(args.encoders, cfg, "--checkpoint's")
    data = meta["extra"].get("data", {})
    args.fps = args.fps or float(data.get("fps", TOY_FPS))
    args.landmark_rows = None
    if args.landmarks is not None:
        try:
            rows = np.load(args.landmarks, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise OptionError(f"--landmarks {str(args.landmarks)!r} is not a readable .npy "
                              f"array ({exc})") from None
        want = 2 * cfg.landmark_points
        if rows.ndim != 2 or rows.shape[1] != want or rows.shape[0] < 1:
            raise OptionError(f"--landmarks {str(args.landmarks)!r} must hold [T, {want}] "
                              f"(T >= 1), got shape {list(rows.shape)}")
        if not np.isfinite(rows).all():
            raise OptionError(f"--landmarks {str(args.landmarks)!r} holds NaN or inf")
        args.landmark_rows = torch.from_numpy(rows.astype("float32"))
    from avatar_models.media import video_info

    if args.audio.suffix.lower() in (".mp4", ".mov", ".mkv", ".webm") and \
            not video_info(args.audio).has_audio:
        raise OptionError(f"--audio {str(args.audio)!r} has no audio track")
    return meta


def reference_inputs(path: Path, size: int,
                     image_embedding=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference frame [3, size, size] in [-1, 1], image embedding) of an image: centre square
    crop, resized; the embedding of its 64 px version in [0, 1], as in training
    (``image_embedding``, default the toy's colour layout [48])."""
    from avatar_models.data import procedural_faces as pf
    from avatar_models.media import read_image
    from samplers.commands.anchored import resize_frames, square_crop

    image, _ = square_crop(read_image(path))
    full = resize_frames(image, pf.SIZE)                                     # [3, 64, 64]
    embed = image_embedding or pf.identity_embedding
    return resize_frames(image, size), embed(((full + 1) / 2).clamp(0, 1))


def run_sample(args: argparse.Namespace) -> int:
    from avatar_models.checkpoint import load_checkpoint
    from avatar_models.data.speech import energy_features
    from avatar_models.mcdm import MCDM, MCDMConfig
    from avatar_models.media import read_audio, to_uint8_frames
    from samplers.lookahead import StreamingMp4, frames_for_audio
    from samplers.mcdm import MCDMSettings, mcdm_sample

    meta = validate_sample_args(args)
    cfg = MCDMConfig.from_dict(meta["config"])
    rate = int(meta["extra"].get("data", {}).get("sample_rate", TOY_SAMPLE_RATE))
    wave, rate = read_audio(args.audio, sample_rate=rate)                    # [1, S]
    wave = wave[0]
    total = args.frames or frames_for_audio(wave.shape[0] / rate, args.fps)
    audio_features, image_embedding = load_encoders(args.encoders, args.device)
    audio_features = audio_features or partial(energy_features, bands=cfg.audio_dim)
    feats = audio_features(wave, rate, args.fps, total)                      # [T, A]
    reference, image = reference_inputs(args.reference, args.frame_size, image_embedding)
    codec = load_codec(args.codec_source, args.device)
    if codec is not None:
        with torch.no_grad():
            reference = codec.encode(reference[None])[0].float()             # [C, S, S]
    model = MCDM(cfg, attention_backend=args.attention_backend)
    model.load_state_dict(load_checkpoint(args.checkpoint, system="mcdm").weights(args.weights))
    model = model.to(args.device).eval()
    samples_per_frame = rate / args.fps

    with StreamingMp4(args.out, args.fps, sample_rate=rate, fragmented=args.fragmented) as out:
        def write(frames: torch.Tensor, first: int) -> None:
            # frame j shows samples [j sr / fps, (j + 1) sr / fps); silence past the audio's end
            a = int(round(first * samples_per_frame))
            b = int(round((first + frames.shape[0]) * samples_per_frame))
            chunk = torch.nn.functional.pad(wave[a:b], (0, max(0, b - a - wave[a:b].shape[0])))
            out.write(to_uint8_frames(frames.clamp(-1, 1).cpu()), chunk)

        report = mcdm_sample(
            model, reference=reference, image=image, audio=feats, total_frames=total,
            landmarks=args.landmark_rows,
            settings=MCDMSettings(steps=args.steps, prior_steps=args.prior_steps),
            decode=None if codec is None else lambda z: codec.decode(z.float().cpu()),
            writer=write, generator=torch.Generator().manual_seed(args.seed),
            device=args.device, progress=not args.no_progress)
    seams = report["seams"]
    ratio = seams["seam_to_inner"]
    print(f"wrote {args.out} ({report['frames']} frames in {report['clips']} clips, "
          f"{args.fps:g} fps, landmarks {'given' if args.landmark_rows is not None else 'none'}"
          f"; seam/inner jump {'n/a' if ratio is None else f'{ratio:.3f}'} over "
          f"{seams['boundaries']} boundaries)")
    return 0


# ---- demo ----

def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from samplers.demo.mcdm_demo import ARMS, ASSETS, MCDMDemoOptions

    d = MCDMDemoOptions()
    parser.add_argument("--out", type=Path, default=Path("out-mcdm"), help="output folder")
    parser.add_argument("--assets", type=Path, default=ASSETS,
                        help="folder of the toy checkpoints (`make train-mcdm`)")
    parser.add_argument("--pairs", type=positive_int, default=d.pairs,
                        help="held-out identities (seeds 1,000,000 + i); intervals over them")
    parser.add_argument("--frames", type=int_range(8), default=d.frames,
                        help="frames per video (Fig. 5's frame axis; about 0.1 s per frame "
                             "and arm on one CPU thread at the default steps, 74 min for 1800; "
                             "the evaluation holds every video: 1.9 GB peak at 1800)")
    parser.add_argument("--steps", type=positive_int, default=d.steps,
                        help="video DDIM steps (chosen for the CPU budget)")
    parser.add_argument("--prior-steps", type=positive_int, default=d.prior_steps,
                        help="motion-prior DDIM steps")
    parser.add_argument("--window", type=positive_int, default=d.window,
                        help="frames per window of the Fig. 5 curves")
    parser.add_argument("--arms", default=",".join(d.arms),
                        help=f"comma-separated subset of {list(ARMS)}")
    parser.add_argument("--clip-x0", type=positive_float, nargs=2, default=None,
                        metavar=("VIDEO", "PRIOR"),
                        help="clamp DDIM's predicted x0 of the video to [-VIDEO, VIDEO] and of "
                             "the motion prior to [-PRIOR, PRIOR] (default: no clamp)")
    parser.add_argument("--seed", type=int, default=d.seed, help="noise seed of pair 0")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")


def run_demo(args: argparse.Namespace) -> int:
    from samplers.demo.mcdm_demo import MCDMDemoOptions, finite, run_mcdm_demo

    try:
        opts = MCDMDemoOptions(pairs=args.pairs, frames=args.frames, steps=args.steps,
                               prior_steps=args.prior_steps, window=args.window,
                               clip_video=args.clip_x0[0] if args.clip_x0 else None,
                               clip_prior=args.clip_x0[1] if args.clip_x0 else None,
                               seed=args.seed, arms=tuple(a for a in args.arms.split(",") if a),
                               assets=args.assets)
    except ValueError as exc:
        raise OptionError(f"--arms/--frames: {exc}") from None
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    doc = run_mcdm_demo(opts, args.out, progress=not args.no_progress)
    return 0 if finite(doc) else 1

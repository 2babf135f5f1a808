"""Video, audio and image files in and out (PyAV + Pillow), and a contact-sheet helper.

Conventions (the whole library uses them):

- Frames from and to files are ``uint8`` ``[T, H, W, 3]`` RGB (channels last), on the CPU.
- Model-side frames are float ``[..., 3, H, W]`` in ``[-1, 1]``; :func:`to_model_frames` and
  :func:`to_uint8_frames` convert between the two.
- Audio is float32 ``[C, S]`` (channels, samples) in ``[-1, 1]`` plus an integer sample rate.
- Written videos are H.264 (libx264, yuv420p) in mp4, with optional AAC audio. yuv420p needs an
  even width and height: odd sizes raise ``ValueError`` unless ``pad_to_even=True``.

Example (demo)::

    from avatar_models import media
    media.write_video("out.mp4", media.to_uint8_frames(frames), fps=25.0,
                      audio=wave, sample_rate=16000)
    media.contact_sheet([row_a, row_b], labels=["source", "ours"], path="sheet.png")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from avatar_models.conditioning._checks import (
    as_tensor,
    check_dim,
    check_dtype,
    check_file,
    check_positive,
    check_rank,
)

PathLike = str | os.PathLike

__all__ = [
    "VideoData", "VideoInfo", "video_info", "read_video", "read_audio", "resample_audio",
    "write_video", "read_image", "write_image", "to_uint8_frames", "to_model_frames",
    "contact_sheet",
]

_SEEK_GAP = 48  # decode forward through gaps up to this many frames; seek for larger ones


class VideoData(NamedTuple):
    """What :func:`read_video` returns (unpacks as ``frames, fps, audio, sample_rate``)."""

    frames: torch.Tensor  #: uint8 [T, H, W, 3] RGB
    fps: float
    audio: torch.Tensor | None  #: float32 [C, S] in [-1, 1], or None (no audio / not asked)
    sample_rate: int | None


@dataclass(frozen=True)
class VideoInfo:
    """Container metadata read without decoding frames."""

    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    duration: float  #: seconds, num_frames / fps
    has_audio: bool
    audio_sample_rate: int | None


# ----------------------------------------------------------------------------------------- reading

def _fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise ValueError(f"cannot determine the frame rate of {stream.container.name!r}")
    return float(rate)


def video_info(path: PathLike) -> VideoInfo:
    """Frame count, fps, size and audio presence of a video file (headers only)."""
    path = check_file(path, "video file")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{str(path)!r} has no video stream")
        stream = container.streams.video[0]
        fps = _fps(stream)
        num_frames = stream.frames
        if num_frames <= 0:  # some containers do not store it: count packets instead
            num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(str(path), int(num_frames), fps, stream.codec_context.width,
                         stream.codec_context.height, num_frames / fps, audio is not None,
                         audio.sample_rate if audio is not None else None)


def _frame_index(frame: av.VideoFrame, start: int, time_base: Fraction, fps: float) -> int:
    return int(round(float((frame.pts - start) * time_base) * fps))


def _decode_selected(path: Path, wanted: list[int]) -> dict[int, np.ndarray]:
    """Decode the frames with the given (sorted, unique) indices, seeking over large gaps.

    Frame indices come from timestamps (constant frame rate). When they do not line up
    (variable frame rate, odd seeks) or run out, fall back to counting decoded frames, which
    also gives the definitive out-of-range error.
    """
    out: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps, tb = _fps(stream), stream.time_base
        start = stream.start_time or 0
        k, frames, last = 0, None, -1
        while k < len(wanted):
            if frames is None or wanted[k] - last > _SEEK_GAP:
                if wanted[k] > _SEEK_GAP:
                    ts = start + int(wanted[k] / fps / tb)
                    container.seek(ts, stream=stream, backward=True, any_frame=False)
                elif frames is not None:
                    container.seek(start, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for frame in frames:
                last = _frame_index(frame, start, tb, fps)
                if last < wanted[k]:
                    continue
                if last > wanted[k]:
                    return _decode_linear(path, wanted)
                out[last] = frame.to_ndarray(format="rgb24")
                k += 1
                if k == len(wanted) or wanted[k] - last > _SEEK_GAP:
                    break
            else:
                return _decode_linear(path, wanted)
    return out


def _decode_linear(path: Path, wanted: list[int]) -> dict[int, np.ndarray]:
    want, out, i = set(wanted), {}, -1
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in want:
                out[i] = frame.to_ndarray(format="rgb24")
                if len(out) == len(want):
                    return out
    missing = min(want - set(out))
    raise ValueError(f"frames index {missing} out of range: {str(path)!r} has {i + 1} frames")


def read_video(path: PathLike, *, frames: Sequence[int] | torch.Tensor | None = None,
               with_audio: bool = True, audio_sample_rate: int | None = None,
               mono: bool = False) -> VideoData:
    """Read a video file.

    Args:
        path: video file (anything FFmpeg reads).
        frames: optional frame indices to return, in the order given (duplicates allowed).
            Frames are decoded forward, seeking over large gaps, so a few frames of a long video
            are cheap. ``None`` decodes every frame.
        with_audio: also decode the first audio stream (whole file).
        audio_sample_rate: resample the audio to this rate (default: keep the file's rate).
        mono: downmix the audio to one channel.

    Returns:
        :class:`VideoData` ``(frames uint8 [T, H, W, 3], fps, audio float32 [C, S] | None,
        sample_rate | None)``.
    """
    path = check_file(path, "video file")
    if frames is None:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{str(path)!r} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = _fps(stream)
            arrays = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        if not arrays:
            raise ValueError(f"{str(path)!r} has no decodable video frames")
        video = torch.from_numpy(np.stack(arrays))
    else:
        idx = [int(i) for i in (frames.tolist() if isinstance(frames, torch.Tensor) else frames)]
        if not idx:
            raise ValueError("frames must hold at least one index, got an empty sequence")
        if min(idx) < 0:
            raise ValueError(f"frames indices must be >= 0, got {min(idx)}")
        info = video_info(path)
        fps = info.fps
        decoded = _decode_selected(path, sorted(set(idx)))
        video = torch.from_numpy(np.stack([decoded[i] for i in idx]))
    audio, sr = None, None
    if with_audio and _has_audio(path):
        audio, sr = read_audio(path, sample_rate=audio_sample_rate, mono=mono)
    return VideoData(video, fps, audio, sr)


def _has_audio(path: Path) -> bool:
    with av.open(str(path)) as container:
        return bool(container.streams.audio)


def read_audio(path: PathLike, *, sample_rate: int | None = None, mono: bool = True,
               start: float = 0.0, end: float | None = None) -> tuple[torch.Tensor, int]:
    """Decode the first audio stream of a media file.

    Args:
        path: audio or video file.
        sample_rate: resample to this rate (FFmpeg's swresample); default keeps the file's rate.
        mono: downmix to one channel (default) else keep the channels.
        start, end: optional time window in seconds.

    Returns:
        ``(waveform float32 [C, S] in [-1, 1], sample_rate)``; ``C == 1`` when ``mono``.
    """
    path = check_file(path, "audio/video file")
    if sample_rate is not None:
        check_positive("sample_rate", sample_rate, integer=True)
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"need 0 <= start <= end, got start={start}, end={end}")
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{str(path)!r} has no audio stream")
        stream = container.streams.audio[0]
        rate = sample_rate or stream.sample_rate
        layout = "mono" if mono else stream.layout.name
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = []
        for frame in container.decode(stream):
            if end is not None and frame.time is not None and frame.time > end + 0.5:
                break  # decoded past the window (the margin covers resampler delay)
            chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray() for f in resampler.resample(None))
        stored = None  # the encoder pads its last frame; the stream duration says where it ends
        if stream.duration is not None and stream.time_base is not None:
            stored = int(round(float(stream.duration * stream.time_base) * rate))
    channels = 1 if mono else len(av.AudioLayout(layout).channels)
    wave = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    if stored is not None and 0 < stored < wave.shape[1]:
        wave = wave[:, :stored]
    lo = int(round(start * rate))
    hi = wave.shape[1] if end is None else int(round(end * rate))
    return torch.from_numpy(np.ascontiguousarray(wave[:, lo:hi], dtype=np.float32)), int(rate)


def _layout(channels: int, name: str) -> str:
    if channels == 1:
        return "mono"
    if channels == 2:
        return "stereo"
    raise ValueError(f"{name} must have 1 or 2 channels ([C, S]), got {channels}")


def resample_audio(waveform: torch.Tensor, sample_rate: int, target_rate: int) -> torch.Tensor:
    """Resample ``waveform`` float [C, S] (or [S]) from ``sample_rate`` to ``target_rate``
    with FFmpeg's swresample. Returns float32 with the same rank."""
    wave = as_tensor("waveform", waveform)
    check_rank("waveform", wave, (1, 2), "[C, S] or [S]")
    check_dtype("waveform", wave)
    check_positive("sample_rate", sample_rate, integer=True)
    check_positive("target_rate", target_rate, integer=True)
    squeeze = wave.dim() == 1
    wave2 = wave[None] if squeeze else wave
    if sample_rate == target_rate:
        return wave.float()
    layout = _layout(wave2.shape[0], "waveform")
    arr = np.ascontiguousarray(wave2.detach().float().cpu().numpy())
    frame = av.AudioFrame.from_ndarray(arr, format="fltp", layout=layout)
    frame.sample_rate, frame.pts = sample_rate, 0
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=target_rate)
    parts = [f.to_ndarray() for f in resampler.resample(frame)]
    parts += [f.to_ndarray() for f in resampler.resample(None)]
    out = np.concatenate(parts, axis=1) if parts else np.zeros((arr.shape[0], 0), np.float32)
    n = int(round(arr.shape[1] * target_rate / sample_rate))
    if out.shape[1] < n:
        out = np.pad(out, ((0, 0), (0, n - out.shape[1])))
    res = torch.from_numpy(np.ascontiguousarray(out[:, :n], dtype=np.float32))
    return res[0] if squeeze else res


# ----------------------------------------------------------------------------------------- writing

def _frames_uint8(name: str, frames: object, ranks=(4,), layout="[T, H, W, 3]") -> torch.Tensor:
    x = as_tensor(name, frames)
    check_rank(name, x, ranks, layout)
    check_dim(name, x, -1, 3, layout)
    if x.dtype != torch.uint8:
        raise TypeError(f"{name} must have dtype uint8 {layout}, got "
                        f"{str(x.dtype).removeprefix('torch.')} (float model frames in [-1, 1]: "
                        f"convert with media.to_uint8_frames)")
    return x.detach().cpu()


def write_wav(path: PathLike, wave: torch.Tensor, sample_rate: int) -> Path:
    """Mono 16-bit PCM wav of ``wave`` [S] in [-1, 1] (clamped); returns the path."""
    if wave.dim() != 1:
        raise ValueError(f"wave: expected mono [S], got shape {list(wave.shape)}")
    pcm = (wave.detach().cpu().float().clamp(-1, 1).numpy()[None] * 32767).round()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=sample_rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return Path(path)


def write_video(path: PathLike, frames: torch.Tensor | np.ndarray, fps: float, *,
                audio: torch.Tensor | np.ndarray | None = None, sample_rate: int | None = None,
                crf: int = 18, pad_to_even: bool = False,
                keyframe_interval: int | None = None) -> Path:
    """Write an H.264 mp4 (libx264, yuv420p), with optional AAC audio.

    Args:
        path: output file (parent folders are created).
        frames: uint8 ``[T, H, W, 3]`` RGB (tensor or array); see :func:`to_uint8_frames`.
        fps: frame rate (float or Fraction; 29.97 is stored as 2997/100).
        audio: optional float ``[C, S]`` or ``[S]`` in ``[-1, 1]``, C in {1, 2}.
        sample_rate: audio sample rate, required with ``audio``.
        crf: x264 constant rate factor (0 = lossless luma, 18 = visually lossless, 23 default).
        pad_to_even: yuv420p needs even H and W; pad the last row/column by replication instead
            of raising ``ValueError``.
        keyframe_interval: x264 GOP size (default: x264's own).

    Returns:
        The path written.
    """
    x = _frames_uint8("frames", frames)
    if x.shape[0] == 0:
        raise ValueError("frames must hold at least one frame, got T=0")
    check_positive("fps", fps)
    t, h, w, _ = x.shape
    if h % 2 or w % 2:
        if not pad_to_even:
            raise ValueError(f"frames height and width must be even for yuv420p, got H={h}, W={w}"
                             f"; crop them or pass pad_to_even=True")
        x = torch.nn.functional.pad(x.permute(0, 3, 1, 2).float(), (0, w % 2, 0, h % 2),
                                    mode="replicate").round().to(torch.uint8).permute(0, 2, 3, 1)
        h, w = h + h % 2, w + w % 2
    wave = None
    if audio is not None:
        if sample_rate is None:
            raise ValueError("sample_rate is required when audio is given")
        check_positive("sample_rate", sample_rate, integer=True)
        wave = as_tensor("audio", audio)
        check_rank("audio", wave, (1, 2), "[C, S] or [S]")
        check_dtype("audio", wave)
        wave = wave[None] if wave.dim() == 1 else wave
        layout = _layout(wave.shape[0], "audio")
        wave = np.ascontiguousarray(wave.detach().float().cpu().clamp(-1, 1).numpy())
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        vs = container.add_stream("libx264", rate=rate)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        options = {"crf": str(int(crf))}
        if keyframe_interval is not None:
            options["g"] = str(int(keyframe_interval))
        vs.options = options
        as_ = None
        if wave is not None:
            as_ = container.add_stream("aac", rate=int(sample_rate))
            as_.layout = layout
        arr = x.numpy()
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr[i]), format="rgb24")
            frame.pts = i
            container.mux(vs.encode(frame))
        container.mux(vs.encode(None))
        if as_ is not None:
            size = as_.codec_context.frame_size or 1024
            for s in range(0, wave.shape[1], size):
                chunk = np.ascontiguousarray(wave[:, s:s + size])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
                frame.sample_rate, frame.pts = int(sample_rate), s
                container.mux(as_.encode(frame))
            container.mux(as_.encode(None))
    return path


# ------------------------------------------------------------------------------------------ images

def read_image(path: PathLike) -> torch.Tensor:
    """Read an image file as uint8 ``[H, W, 3]`` RGB (alpha dropped, grey expanded)."""
    path = check_file(path, "image file")
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8))


def write_image(path: PathLike, image: torch.Tensor | np.ndarray) -> Path:
    """Write uint8 ``[H, W, 3]`` RGB to ``path`` (format from the suffix, e.g. .png)."""
    x = _frames_uint8("image", image, ranks=(3,), layout="[H, W, 3]")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(x.numpy()).save(path)
    return path


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """Model frames float ``[..., 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[..., H, W, 3]`` (CPU).

    Values outside ``[-1, 1]`` are clipped; rounding is to nearest.
    """
    x = as_tensor("frames", frames)
    check_rank("frames", x, (3, 4, 5), "[..., 3, H, W]")
    check_dim("frames", x, -3, 3, "[..., 3, H, W]")
    check_dtype("frames", x)
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).contiguous().cpu()


def to_model_frames(frames: torch.Tensor | np.ndarray,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float ``[..., 3, H, W]`` in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    x = _frames_uint8("frames", frames, ranks=(3, 4, 5), layout="[..., H, W, 3]")
    return (x.movedim(-1, -3).to(dtype) / 127.5 - 1).contiguous()


def contact_sheet(rows: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray, *,
                  labels: Sequence[str] | None = None, path: PathLike | None = None,
                  gap: int = 2, background: int = 255, ncols: int | None = None) -> Image.Image:
    """Tile frames into one image, one row per sequence, with optional row labels on the left.

    Args:
        rows: a list of uint8 ``[N_i, H, W, 3]`` sequences (rows may differ in length; all frames
            share H, W), a uint8 ``[R, N, H, W, 3]`` array, or a uint8 ``[N, H, W, 3]`` array
            split into rows of ``ncols`` frames (default: one row).
        labels: one string per row, drawn in a left margin.
        path: if given, the sheet is also saved there as PNG.
        gap: pixels between tiles; background: grey level of gaps and margins.

    Returns:
        A ``PIL.Image.Image`` (RGB).
    """
    if isinstance(rows, (torch.Tensor, np.ndarray)):
        x = _frames_uint8("rows", rows, ranks=(4, 5), layout="[R, N, H, W, 3] or [N, H, W, 3]")
        if x.dim() == 4:
            step = ncols or x.shape[0]
            row_list = [x[i:i + step] for i in range(0, x.shape[0], step)]
        else:
            row_list = list(x)
    else:
        row_list = [_frames_uint8(f"rows[{i}]", r, layout="[N, H, W, 3]")
                    for i, r in enumerate(rows)]
    if not row_list or max(r.shape[0] for r in row_list) == 0:
        raise ValueError("rows must hold at least one frame")
    h, w = row_list[0].shape[1:3]
    for i, r in enumerate(row_list):
        if tuple(r.shape[1:3]) != (h, w):
            raise ValueError(f"rows[{i}] frames must be {h}x{w} like rows[0], got "
                             f"{r.shape[1]}x{r.shape[2]}")
    if labels is not None and len(labels) != len(row_list):
        raise ValueError(f"labels must have one entry per row ({len(row_list)}), got {len(labels)}")
    font = ImageFont.load_default()
    margin = 0
    if labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = int(max(probe.textlength(str(s), font=font) for s in labels)) + 2 * gap + 4
    cols = max(r.shape[0] for r in row_list)
    sheet = Image.new("RGB", (margin + cols * (w + gap) + gap, len(row_list) * (h + gap) + gap),
                      (background,) * 3)
    draw = ImageDraw.Draw(sheet)
    for ri, r in enumerate(row_list):
        y = gap + ri * (h + gap)
        for ci in range(r.shape[0]):
            sheet.paste(Image.fromarray(r[ci].numpy()), (margin + gap + ci * (w + gap), y))
        if labels:
            ink = (0, 0, 0) if background > 127 else (255, 255, 255)
            top, bottom = draw.textbbox((0, 0), str(labels[ri]), font=font)[1::2]
            draw.text((gap + 2, y + (h - (bottom - top)) // 2 - top), str(labels[ri]), fill=ink,
                      font=font)
    if path is not None:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path, format="PNG")
    return sheet

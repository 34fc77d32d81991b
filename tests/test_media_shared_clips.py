"""The media pipeline on every licensed real clip in ../shared/media (skipped where absent).

Decode/write part: the probe agrees with the manifest, the streaming decoder yields exactly the
probed frame count, the reference's own audio is as long as its frames, every driving-audio file
loads, and a written mp4 re-decodes with the same frame count and audio duration within a frame.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_media_rows

from sparse_avatar.media import iter_video_frames, load_audio, load_reference_video, probe_media, write_video

pytestmark = pytest.mark.media

VIDEO_ROWS = shared_media_rows("video")
AUDIO_ROWS = shared_media_rows("audio")


def _ids(rows):
    return [row["file"].split("_")[0] for row in rows]


@pytest.mark.parametrize("row", VIDEO_ROWS or [None], ids=_ids(VIDEO_ROWS) or ["none"])
def test_shared_clip_probe_and_decode(shared_media_dir, row):
    if row is None:
        pytest.skip("the manifest lists no video clips")
    path = shared_media_dir / row["file"]
    info = probe_media(path)
    width, height = (int(v) for v in row["resolution"].split("x"))
    assert (info.width, info.height) == (width, height)
    assert info.video_codec == row["video_codec"]
    assert info.has_audio == (row["has_audio"] == "yes")
    assert info.duration_s == pytest.approx(float(row["duration_s"]), abs=0.15)
    # Stream at the probed constant rate, downscaled in the decoder, without keeping frames.
    count, last_time = 0, -1.0
    for index, time_s, image in iter_video_frames(path, max_side=96):
        assert index == count and time_s > last_time and image.dtype == np.uint8 and max(image.shape[:2]) == 96
        count, last_time = count + 1, time_s
    expected = int(np.ceil(info.duration_s * info.cfr_fps - 1e-6))
    assert count == expected
    if not info.is_vfr:
        assert count == info.n_frames


@pytest.mark.parametrize("row", VIDEO_ROWS or [None], ids=_ids(VIDEO_ROWS) or ["none"])
def test_shared_clip_reference_and_rewrite(shared_media_dir, row, tmp_path):
    if row is None:
        pytest.skip("the manifest lists no video clips")
    path = shared_media_dir / row["file"]
    reference = load_reference_video(path, start_s=1.0, end_s=3.0, max_side=128)
    assert reference.n_frames == round(2.0 * reference.fps)
    assert reference.has_audio and reference.audio.shape[0] == round(reference.n_frames / reference.fps * 16000)
    assert np.isfinite(reference.audio).all() and np.abs(reference.audio).max() > 0.01  # real speech, not padding
    out = write_video(tmp_path / "rewritten.mp4", reference.frames, reference.fps, audio=reference.audio)
    info = probe_media(out)
    assert info.n_frames == reference.n_frames and info.video_codec == "h264" and info.audio_codec == "aac"
    redecoded = load_reference_video(out)
    assert redecoded.n_frames == reference.n_frames
    assert abs(load_audio(out).shape[0] / 16000 - reference.duration_s) < 1 / reference.fps
    # H.264 at crf 18 keeps the picture: PSNR well above visible-damage levels.
    mse = np.mean((redecoded.frames.astype(np.float64) - reference.frames.astype(np.float64)) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35


@pytest.mark.parametrize("row", AUDIO_ROWS or [None], ids=_ids(AUDIO_ROWS) or ["none"])
def test_shared_driving_audio_loads(shared_media_dir, row):
    if row is None:
        pytest.skip("the manifest lists no audio files")
    wave = load_audio(shared_media_dir / row["file"], allow_silence=False)
    assert wave.dtype == np.float32 and wave.ndim == 1 and np.isfinite(wave).all()
    assert wave.shape[0] / 16000 == pytest.approx(float(row["duration_s"]), abs=0.05)

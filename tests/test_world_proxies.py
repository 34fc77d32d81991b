"""Real-clip proxies over the licensed clips in ../shared/media (skipped when absent): the sync
proxy prefers each clip's own audio on average, and the identity proxy finds each clip's other
half, and the same person in another clip, nearer than other people."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_media_rows
from sparse_avatar.avatar_world.proxies import face_crops, identity_distance, identity_embedding, real_sync_proxy

pytestmark = pytest.mark.media


@pytest.fixture(scope="module")
def real_clips():
    from conftest import SHARED_MEDIA_DIR
    from sparse_avatar import media

    rows = shared_media_rows("video")
    if len(rows) < 3:
        pytest.skip(f"fewer than 3 licensed clips at {SHARED_MEDIA_DIR}")
    clips = {}
    for row in rows:
        video = media.load_reference_video(str(SHARED_MEDIA_DIR / row["file"]), end_s=6, max_side=256)
        clips[row["file"]] = (face_crops(video.frames, video.fps), video.audio, video.fps)
    return clips


def test_sync_proxy_prefers_the_clips_own_audio_on_average(real_clips):
    names = list(real_clips)
    own, swapped = [], []
    for index, name in enumerate(names):
        crops, audio, fps = real_clips[name]
        other_audio = real_clips[names[(index + 1) % len(names)]][1]
        own.append(real_sync_proxy(crops, audio, fps)["sync_correlation"])
        swapped.append(real_sync_proxy(crops, other_audio, fps)["sync_correlation"])
    assert np.mean(own) > np.mean(swapped) + 0.08, (own, swapped)
    assert np.mean(own) > 0.15


def test_identity_proxy_finds_the_same_person(real_clips):
    halves = {}
    for name, (crops, _, _) in real_clips.items():
        middle = len(crops) // 2
        halves[name] = (identity_embedding(crops[:middle]), identity_embedding(crops[middle:]))
    for name, (first, second) in halves.items():
        same = identity_distance(first, second)
        others = [identity_distance(first, halves[other][1]) for other in halves if other != name]
        assert same < 0.5 * min(others), name
    # Two different clips of the same person (AOC, from SadTalker and video-retalking).
    pair = ("v08_sadtalker_hdtf_aoc_8s.mp4", "v12_retalking_face3_aoc_5s.mp4")
    if all(name in halves for name in pair):
        across = identity_distance(halves[pair[0]][0], halves[pair[1]][0])
        strangers = [identity_distance(halves[pair[0]][0], halves[n][0]) for n in halves if n not in pair]
        assert across < min(strangers)

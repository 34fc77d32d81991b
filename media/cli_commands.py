"""Media commands: ``probe`` (what the pack sees in a file) and ``features`` (speech features to a
file). The main job, ``demo``, renders with the shipped model and lives in ``demo.py``."""
from __future__ import annotations
# Imports inside the handlers: `python -m sparse_avatar --help` imports every cli_commands module
# and must stay fast; each command loads only its own stack.

import json
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
    features.add_argument("--speech-features", default="logmel", choices=("logmel", "whisper"),
                          help="which definition: logmel (default) or whisper (Whisper tiny.en's encoder; the whisper extra)")
    features.set_defaults(handler=run_features)


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
    return {"sampled_frames": len(frames), "coverage": float(track.coverage), "faces_seen": int(track.n_faces_seen),
            "detector": track.source, "warnings": list(track.warnings)}


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
                  f"{faces['faces_seen']} face(s) seen" + (f" ({faces['detector']})" if faces.get("detector") else ""))
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
    from .features import feature_id_named, frame_speech_features

    feature_id = feature_id_named(args.speech_features)
    wave = load_audio(args.audio, sample_rate=SPEECH_SAMPLE_RATE, allow_silence=False)
    features = frame_speech_features(wave, SPEECH_SAMPLE_RATE, args.fps, n_frames=args.frames, feature_id=feature_id)
    out = save_array_atomically(Path(args.out), features, {
        "feature_id": feature_id, "fps": repr(float(args.fps)), "source": Path(args.audio).name,
    })
    print(f"wrote {out}: {features.shape[0]} frames x {features.shape[1]} features ({feature_id}) "
          f"for {wave.shape[0] / SPEECH_SAMPLE_RATE:.2f} s of audio at {args.fps:g} fps")
    return 0

"""Video in and out with PyAV: probe, streaming decode to a constant frame rate, the reference video
with its own aligned audio, and atomic H.264 + AAC mp4 writing.

Timeline convention: time 0 is the presentation time of the first video frame (stream start_time
offsets are removed), so frame ``i`` of a decode at ``fps`` sits at ``start_s + i / fps`` and the
reference's own audio sample 0 lines up with output frame 0.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from ..errors import UserFacingError
from ..files import atomic_temp_path, disk_full_error, is_disk_full
from ._pyav import FFmpegError, av
from .audio import (
    SPEECH_SAMPLE_RATE,
    decode_audio_stream,
    fit_to_length,
    logger,
    resample_audio,
)
from .paths import resolve_input_path

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
# Frame-interval spread (relative to the median) above which a stream counts as variable-rate.
_VFR_TOLERANCE = 0.1
_FFMPEG_ERRORS = (FFmpegError, OSError, EOFError)


@dataclass(frozen=True)
class MediaInfo:
    """What the pack sees in a media file. Video fields are 0/None for audio-only files."""

    path: Path
    container: str
    video_streams: int
    video_codec: str | None
    width: int  # after rotation
    height: int  # after rotation
    rotation: int  # clockwise degrees applied on decode (0, 90, 180, 270)
    fps: float  # average
    is_vfr: bool
    duration_s: float  # of the video stream (audio duration for audio-only files)
    n_frames: int
    audio_streams: int
    audio_codec: str | None
    sample_rate: int | None
    channels: int | None
    has_audio: bool
    audio_duration_s: float | None = None
    cfr_fps: float = 0.0  # the rate iter_video_frames uses by default (nominal rate for VFR)

    @property
    def has_video(self) -> bool:
        return self.video_streams > 0


@dataclass
class ReferenceVideo:
    """A decoded reference clip: CFR frames plus its own audio aligned to frame 0."""

    frames: np.ndarray  # uint8 [T,H,W,3] RGB
    fps: float
    audio: np.ndarray | None  # float32 mono at 16 kHz, exactly T / fps seconds long, or None
    has_audio: bool
    source_path: Path | None
    source_hash: str  # sha256 of the file (or of the pixels for in-memory sources)
    sample_rate: int = SPEECH_SAMPLE_RATE
    warnings: list[str] = field(default_factory=list)
    # Where frame 0 sits in the source (seconds), so a later stage can re-stream the same range
    # from source_path at full size (iter_video_frames(source_path, fps=fps, start_s=start_s)).
    start_s: float = 0.0
    # Which face the pack follows when several are in view (media.FACE_CHOICES): the user's choice,
    # carried with the clip so every stage that tracks it (identity, dub, training) picks the same.
    face: str = "largest"

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps


# ----------------------------------------------------------------------------------------- probe


def _open_container(path: Path):
    try:
        return av.open(str(path))
    except _FFMPEG_ERRORS as error:
        raise UserFacingError(
            f"{path.name} is not a readable media file ({_short(error)}); it may be truncated, "
            "random data or an unsupported format - re-export it as mp4 (H.264) or wav"
        ) from None


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
    return text[:160]


def _rotation_of_frame(frame, stream) -> int:
    """Clockwise degrees to rotate the decoded picture for display (0/90/180/270).

    FFmpeg's display matrix stores a counter-clockwise angle (PyAV >= 13 exposes it as
    ``frame.rotation``); the legacy ``rotate`` tag stores the clockwise one.
    """
    counter_clockwise = getattr(frame, "rotation", None)
    if counter_clockwise is None:  # PyAV < 13: read the display matrix side data ourselves
        counter_clockwise = _display_matrix_rotation(frame)
    if counter_clockwise:
        degrees = -float(counter_clockwise)
    else:
        try:
            degrees = float(stream.metadata.get("rotate", 0))
        except (TypeError, ValueError):
            degrees = 0.0
    return int(round(degrees / 90.0)) * 90 % 360


def _display_matrix_rotation(frame) -> float | None:
    """FFmpeg's ``av_display_rotation_get`` on a frame's DISPLAYMATRIX side data (counter-clockwise)."""
    for item in getattr(frame, "side_data", None) or ():
        if "DISPLAYMATRIX" not in str(getattr(item, "type", "")):
            continue
        matrix = np.frombuffer(bytes(item), dtype="<i4", count=9).astype(np.float64) / 65536.0
        scale_x, scale_y = math.hypot(matrix[0], matrix[3]), math.hypot(matrix[1], matrix[4])
        if scale_x == 0 or scale_y == 0:
            return None
        return -math.degrees(math.atan2(matrix[1] / scale_y, matrix[0] / scale_x))
    return None


def _default_decode_fps(stream) -> float:
    """Constant rate a decode uses when none is asked for.

    The nominal rate (FFmpeg's guess, e.g. 30 for a phone clip with dropped frames) rather than
    the average (e.g. 22.13): it keeps motion timing and a round number; the missing frames are
    filled by repeating the nearest one.
    """
    average = float(stream.average_rate or 0.0)
    nominal = float(stream.guessed_rate or stream.base_rate or 0.0)
    if nominal and (not average or nominal >= 0.99 * average) and nominal <= 240:
        return nominal
    return average or 25.0


def _apply_rotation(image: np.ndarray, clockwise: int) -> np.ndarray:
    if clockwise == 0:
        return image
    return np.ascontiguousarray(np.rot90(image, k=-(clockwise // 90)))


def _video_origin_s(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def probe_media(path) -> MediaInfo:
    """Read a media file's streams without decoding it all.

    Video packets are demuxed (not decoded) to count frames exactly and detect variable frame
    rate; the first frame is decoded to learn the rotation and to prove the stream is decodable.
    """
    path = resolve_input_path(path)
    container = _open_container(path)
    try:
        return _probe_open(path, container)
    except UserFacingError:
        raise
    except _FFMPEG_ERRORS as error:
        raise UserFacingError(
            f"{path.name} is damaged ({_short(error)}); re-export or re-download it"
        ) from None
    finally:
        container.close()


def _probe_open(path: Path, container) -> MediaInfo:
    videos, audios = container.streams.video, container.streams.audio
    audio = audios[0] if audios else None
    sample_rate = int(audio.rate or audio.codec_context.sample_rate or 0) or None if audio else None
    channels = int(audio.codec_context.channels or 0) or None if audio else None
    audio_duration = None
    if audio is not None and audio.duration is not None:
        audio_duration = float(audio.duration * audio.time_base)
    container_duration = container.duration / av.time_base if container.duration else None
    if audio_duration is None and audio is not None:
        audio_duration = container_duration
    fmt = container.format.name.split(",")[0]
    if not videos:
        if audio is None:
            raise UserFacingError(
                f"{path.name} contains neither video nor audio; it is truncated, damaged or not a media file - "
                "re-download or re-export it"
            )
        return MediaInfo(path, fmt, 0, None, 0, 0, 0, 0.0, False, float(audio_duration or 0.0), 0,
                         len(audios), audio.codec_context.name, sample_rate, channels, True, audio_duration)
    video = videos[0]
    pts = sorted(
        packet.pts for packet in container.demux(video) if packet.pts is not None and packet.size > 0
    )
    if not pts:
        raise UserFacingError(f"{path.name} has a video stream with no frames; the file is empty or truncated")
    time_base = float(video.time_base)
    intervals = np.diff(np.asarray(pts, dtype=np.float64)) * time_base
    intervals = intervals[intervals > 0]
    median_interval = float(np.median(intervals)) if intervals.size else 0.0
    is_vfr = bool(intervals.size and np.max(np.abs(intervals - median_interval)) > _VFR_TOLERANCE * median_interval)
    nominal_fps = float(video.average_rate or video.guessed_rate or 0.0)
    frame_interval = median_interval or (1.0 / nominal_fps if nominal_fps else 0.04)
    duration = (pts[-1] - pts[0]) * time_base + frame_interval
    fps = len(pts) / duration if is_vfr or not nominal_fps else nominal_fps
    # Decode the first frame: proves the codec works and carries the display rotation.
    container.seek(0)
    first = next(container.decode(video), None)
    if first is None:
        raise UserFacingError(f"{path.name}: no video frame could be decoded; the file is damaged - re-export it")
    rotation = _rotation_of_frame(first, video)
    width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    return MediaInfo(
        path, fmt, len(videos), video.codec_context.name, width, height, rotation, fps, is_vfr, duration,
        len(pts), len(audios), audio.codec_context.name if audio else None, sample_rate, channels,
        audio is not None, audio_duration, _default_decode_fps(video),
    )


# ---------------------------------------------------------------------------------------- decode


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(2, int(round(width * scale))), max(2, int(round(height * scale)))


def _check_range(fps, start_s, end_s) -> None:
    if fps is not None and (not math.isfinite(fps) or fps <= 0 or fps > 240):
        raise UserFacingError(f"fps must be between 0 and 240, got {fps}")
    if start_s is not None and (not math.isfinite(start_s) or start_s < 0):
        raise UserFacingError(f"start must be >= 0 seconds, got {start_s}")
    if end_s is not None and start_s is not None and end_s <= start_s:
        raise UserFacingError(f"end ({end_s} s) must be after start ({start_s} s)")


def iter_video_frames(
    path,
    *,
    fps: float | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    max_side: int | None = None,
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Stream ``(frame_index, time_s, rgb_uint8[H,W,3])`` on a constant-rate grid.

    Output frame ``i`` is the decoded frame whose timestamp is nearest to ``start_s + i / fps``
    (default fps: the source's nominal rate), so variable-rate sources come out constant-rate;
    every grid time inside the clip gets a frame, so the count is ceil(duration * fps). Rotation is applied; ``max_side`` downscales in
    FFmpeg's scaler (cheap) before ``transform`` (e.g. a face crop) runs once per distinct source
    frame, so full-size frames are never all held in memory.
    """
    _check_range(fps, start_s, end_s)
    path = resolve_input_path(path)
    container = _open_container(path)
    try:
        if not container.streams.video:
            kind = "an audio-only file" if container.streams.audio else "not a video"
            raise UserFacingError(
                f"{path.name} is {kind}; a reference video is needed here (use the file as driving audio instead)"
            )
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield from _decode_cfr(path, container, stream, fps, start_s or 0.0, end_s, transform, max_side)
    except UserFacingError:
        raise
    except _FFMPEG_ERRORS as error:
        raise UserFacingError(
            f"{path.name} could not be decoded ({_short(error)}); the file is damaged or truncated - re-export it"
        ) from None
    finally:
        container.close()


def _decode_cfr(path, container, stream, fps, start_s, end_s, transform, max_side):
    time_base = stream.time_base
    origin_pts = stream.start_time or 0
    source_fps = _default_decode_fps(stream)
    out_fps = float(fps) if fps else source_fps
    end_limit = math.inf if end_s is None else float(end_s)
    if start_s > 0:
        # Lands on the keyframe at or before start; earlier frames are skipped by the grid below.
        container.seek(origin_pts + int(start_s / time_base), stream=stream, backward=True)

    rotation = None
    index = 0
    emitted_any = False
    previous = None  # (time_s, av frame, cached converted array or None)

    def target_time() -> float:
        return start_s + index / out_fps

    def converted(entry):
        nonlocal rotation
        time_s, frame, array = entry
        if array is None:
            if rotation is None:
                rotation = _rotation_of_frame(frame, stream)
            width, height = _scaled_size(frame.width, frame.height, max_side)
            if (width, height) != (frame.width, frame.height):
                frame = frame.reformat(width=width, height=height, interpolation="AREA")
            array = _apply_rotation(frame.to_ndarray(format="rgb24"), rotation)
            if transform is not None:
                array = transform(array)
            entry[2] = array
        return entry[2]

    for frame in container.decode(stream):
        if frame.pts is None:
            time_s = previous[0] + 1.0 / source_fps if previous else 0.0
        else:
            time_s = float((frame.pts - origin_pts) * time_base)
        if previous is not None and time_s <= previous[0]:
            continue  # duplicate or out-of-order timestamp (broken muxer): keep the earlier frame
        if previous is not None:
            midpoint = 0.5 * (previous[0] + time_s)
            while target_time() < midpoint and target_time() < end_limit - 1e-9:
                yield index, target_time(), converted(previous)
                index += 1
                emitted_any = True
            if target_time() >= end_limit - 1e-9:
                break
        previous = [time_s, frame, None]
    else:
        if previous is not None:
            last_duration = float(previous[1].duration * time_base) if getattr(previous[1], "duration", None) else 0.0
            stream_end = previous[0] + (last_duration or 1.0 / source_fps)
            while target_time() < min(stream_end, end_limit) - 1e-6:
                yield index, target_time(), converted(previous)
                index += 1
                emitted_any = True
    if not emitted_any:
        if previous is None:
            raise UserFacingError(f"{path.name}: no video frame could be decoded; the file is damaged - re-export it")
        raise UserFacingError(
            f"{path.name}: the requested range starts at {start_s:.2f} s, after the end of the video "
            f"({previous[0]:.2f} s); choose an earlier start"
        )


# ---------------------------------------------------------------------------- reference video


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_aligned_audio(path: Path, *, start_s: float, duration_s: float,
                          sample_rate: int = SPEECH_SAMPLE_RATE) -> np.ndarray | None:
    """The file's own audio from video time ``start_s`` for ``duration_s``, mono at ``sample_rate``.

    Aligned to the video timeline (0 = first video frame): a stream that starts later is padded
    with leading silence, one that starts earlier is trimmed. None when the file has no audio.
    """
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        video_origin = _video_origin_s(container.streams.video[0]) if container.streams.video else 0.0
        stream = container.streams.audio[0]
        wave, rate, first_sample_s = decode_audio_stream(container, stream, from_s=video_origin + start_s)
    wave = resample_audio(wave, rate, sample_rate)
    offset_samples = int(round((first_sample_s - video_origin - start_s) * sample_rate))
    if offset_samples > 0:
        wave = np.concatenate([np.zeros(offset_samples, np.float32), wave])
    elif offset_samples < 0:
        wave = wave[-offset_samples:]
    return fit_to_length(wave, int(round(duration_s * sample_rate)))


def load_reference_video(
    source,
    *,
    fps: float | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    max_side: int | None = None,
    allowed_roots=None,
    on_frame: Callable[[int, int], None] | None = None,
) -> ReferenceVideo:
    """Decode a reference clip from a video file (frames in memory: ``reference_from_frames``).

    ``allowed_roots`` confines file paths (see ``resolve_input_path``). ``on_frame(done, total)``
    is called after each decoded frame (progress bars, cancellation); ``total`` is an estimate.
    """
    _check_range(fps, start_s, end_s)
    if max_side is not None and max_side < 16:
        raise UserFacingError(f"max side must be at least 16 pixels (or 0 for no limit), got {max_side}")
    if isinstance(source, (str, os.PathLike)):
        path = resolve_input_path(source, allowed_roots)
        info = probe_media(path)
        if not info.has_video:
            raise UserFacingError(
                f"{path.name} is an audio-only file; a reference video is needed here (use the file as driving audio instead)"
            )
        out_fps = float(fps) if fps else info.cfr_fps
        span = min(end_s if end_s is not None else math.inf, info.duration_s) - (start_s or 0.0)
        expected = max(1, int(math.ceil(span * out_fps)))
        frames_array = _collect_frames(
            iter_video_frames(path, fps=out_fps, start_s=start_s, end_s=end_s, max_side=max_side), expected, on_frame)
        # A file cut short keeps its index: the container promises frames the decoder cannot
        # produce. Say so instead of silently returning a shorter reference.
        if len(frames_array) < expected - 1 - 0.01 * expected:
            decoded_end = (start_s or 0.0) + len(frames_array) / out_fps
            raise UserFacingError(
                f"{path.name} looks truncated: its index lists video up to {(start_s or 0.0) + span:.2f} s but frames "
                f"decode only up to {decoded_end:.2f} s; re-download or re-export it, or set end to "
                f"{math.floor(decoded_end * 10) / 10:.1f} s to use the intact part"
            )
        # The frames are good: a damaged or NaN own audio track makes this a silent reference, with a
        # warning, instead of refusing the clip.
        warnings = []
        try:
            audio = extract_aligned_audio(path, start_s=start_s or 0.0, duration_s=len(frames_array) / out_fps)
        except (*_FFMPEG_ERRORS, ValueError) as error:  # UserFacingError is a ValueError
            audio, problem = None, f"is damaged ({_short(error)})"
        else:
            problem = None if audio is None or np.isfinite(audio).all() else "contains invalid (NaN/infinite) samples"
            if problem:
                audio = None
        if problem:
            warnings.append(f"the audio track of {path.name} {problem}; using the video as a silent reference")
            logger.warning(warnings[-1])
        return ReferenceVideo(frames_array, out_fps, audio, audio is not None, path, file_sha256(path),
                              warnings=warnings, start_s=start_s or 0.0)
    raise UserFacingError(
        f"cannot use a {type(source).__name__} as a reference video; pass a video file path "
        "(frames already in memory: reference_from_frames)"
    )


def _collect_frames(frames: Iterable[tuple[int, float, np.ndarray]], expected: int, on_frame) -> np.ndarray:
    """Stack streamed frames into one array, filling a buffer sized from the probe.

    Appending to a list and stacking at the end holds every frame twice and copies it once more;
    on long clips that costs more than decoding did.
    """
    buffer = None
    extra: list[np.ndarray] = []
    count = 0
    for _, _, image in frames:
        if buffer is None:
            buffer = np.empty((expected, *image.shape), image.dtype)
        if count < expected:
            buffer[count] = image
        else:
            extra.append(image)
        count += 1
        if on_frame is not None:
            on_frame(count, max(expected, count))
    if buffer is None:
        raise UserFacingError("the video has no frames in the requested range; check the start/end times")
    if extra:
        return np.concatenate([buffer, np.stack(extra)])
    return buffer[:count]


def reference_from_frames(frames: np.ndarray, source_fps: float, *, audio: tuple[np.ndarray, int] | None = None,
                          fps: float | None = None, start_s: float | None = None, end_s: float | None = None,
                          max_side: int | None = None) -> ReferenceVideo:
    """A reference from frames in memory: uint8 RGB [T, H, W, 3] at a constant ``source_fps``, with
    their own audio as ``(mono samples, rate)`` or None; the same range, rate and size options as
    ``load_reference_video`` (frames are picked nearest in time, as the file decoder does)."""
    _check_range(fps, start_s, end_s)
    if max_side is not None and max_side < 16:
        raise UserFacingError(f"max side must be at least 16 pixels (or 0 for no limit), got {max_side}")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise UserFacingError(f"reference frames must be uint8 RGB [T, H, W, 3] with T >= 1, got {frames.dtype} {tuple(frames.shape)}")
    if not (math.isfinite(float(source_fps)) and float(source_fps) > 0):
        raise UserFacingError(f"the frames' frame rate must be a positive number, got {source_fps}")
    source_fps = float(source_fps)
    n_source = frames.shape[0]
    out_fps = float(fps) if fps else source_fps
    start = start_s or 0.0
    end = min(end_s if end_s is not None else math.inf, n_source / source_fps)
    if start >= end:
        raise UserFacingError(f"start ({start} s) is at or after the end of the {n_source / source_fps:.2f} s input")
    n_out = max(1, int(math.ceil((end - start) * out_fps - 1e-6)))
    # Nearest source frame for each output time (same rule as the file decoder).
    picks = np.clip(np.floor((start + np.arange(n_out) / out_fps) * source_fps + 0.5 - 1e-9), 0, n_source - 1).astype(int)
    frames = frames[picks]
    height, width = frames.shape[1:3]
    new_width, new_height = _scaled_size(width, height, max_side)
    if (new_width, new_height) != (width, height):
        frames = np.stack([cv2.resize(f, (new_width, new_height), interpolation=cv2.INTER_AREA) for f in frames])
    own_audio, audio = audio, None
    if own_audio is not None:
        wave, rate = np.asarray(own_audio[0], np.float32), int(own_audio[1])
        wave = resample_audio(wave, rate, SPEECH_SAMPLE_RATE)
        wave = wave[int(round(start * SPEECH_SAMPLE_RATE)):]
        audio = fit_to_length(wave, int(round(n_out / out_fps * SPEECH_SAMPLE_RATE)))
        if not np.isfinite(audio).all():
            audio = None
    digest = hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()
    return ReferenceVideo(np.ascontiguousarray(frames), out_fps, audio, audio is not None, None, digest, start_s=start)


# ----------------------------------------------------------------------------------------- write


def _even_padded(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pad by edge replication to the (even) encode size: yuv420p needs even dimensions."""
    pad_y, pad_x = height - frame.shape[0], width - frame.shape[1]
    if pad_y == 0 and pad_x == 0:
        return frame
    return np.pad(frame, ((0, pad_y), (0, pad_x), (0, 0)), mode="edge")


def write_video(
    path,
    frames: Iterable[np.ndarray] | np.ndarray,
    fps: float,
    *,
    audio: np.ndarray | None = None,
    sample_rate: int = SPEECH_SAMPLE_RATE,
    crf: int = 18,
) -> Path:
    """Write uint8 RGB frames (+ mono audio) as an H.264/AAC mp4, atomically.

    The video lasts exactly n_frames / fps; audio is trimmed or padded with silence to that length
    and interleaved as frames arrive (so ``frames`` may be a generator). Odd sizes are padded to
    even. Nothing is left at ``path`` (or beside it) if anything fails.
    """
    try:
        fps_value = float(fps)
    except (TypeError, ValueError):
        fps_value = math.nan
    if not (math.isfinite(fps_value) and 0 < fps_value <= 240):
        raise UserFacingError(f"fps must be between 0 and 240, got {fps}")
    # 29.97 -> 2997/100 and 30000/1001 stay exact; the container time base is 1/rate.
    rate = fps if isinstance(fps, Fraction) else Fraction(fps_value).limit_denominator(1001)
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim == 2 and 1 in audio.shape:
            audio = audio.reshape(-1)
        if audio.ndim != 1:
            raise UserFacingError(f"audio to write must be mono samples [S], got shape {audio.shape}; mix it down first")
        if not np.isfinite(audio).all():
            raise UserFacingError("the audio to write contains NaN/infinite samples; check the step that produced it")
    final_path = Path(path).expanduser().resolve()
    if final_path.suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise UserFacingError(f"output must be an .mp4 file, got {final_path.name}")
    final_path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = atomic_temp_path(final_path)
    try:
        n_frames = _encode_mp4(temp_path, frames, rate, audio, sample_rate, crf)
        if n_frames == 0:
            raise UserFacingError("no frames to write; the video would be empty")
        os.replace(temp_path, final_path)
    except Exception as error:
        if is_disk_full(error):
            raise disk_full_error(final_path) from None
        raise
    finally:
        if temp_path.exists():
            temp_path.unlink()
    return final_path


def _encode_mp4(temp_path: Path, frames, rate: Fraction, audio, sample_rate, crf) -> int:
    with av.open(str(temp_path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        video_stream = None
        audio_stream = audio_frame_size = None
        audio_written = 0
        n_frames = 0
        width = height = None
        for frame in frames:
            frame = np.asarray(frame)
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise UserFacingError(f"frames must be uint8 RGB [H,W,3], got {frame.dtype} {tuple(frame.shape)}")
            if video_stream is None:
                height, width = frame.shape[0] + frame.shape[0] % 2, frame.shape[1] + frame.shape[1] % 2
                source_shape = frame.shape
                video_stream = container.add_stream("libx264", rate=rate)
                video_stream.width, video_stream.height = width, height
                video_stream.pix_fmt = "yuv420p"
                video_stream.codec_context.time_base = 1 / rate
                video_stream.options = {"crf": str(int(crf)), "preset": "medium"}
                if audio is not None:
                    audio_stream = container.add_stream("aac", rate=int(sample_rate), layout="mono")
                    audio_stream.codec_context.time_base = Fraction(1, int(sample_rate))
            elif frame.shape != source_shape:
                raise UserFacingError(f"all frames must have one size; frame {n_frames} is {frame.shape[:2]}, not {source_shape[:2]}")
            video_frame = av.VideoFrame.from_ndarray(_even_padded(frame, width, height), format="rgb24")
            video_frame.pts = n_frames
            video_frame.time_base = 1 / rate
            container.mux(video_stream.encode(video_frame))
            n_frames += 1
            if audio_stream is not None:
                # Interleave: audio up to the end of this frame (padded with silence past its end).
                audio_end = int(round(n_frames / rate * sample_rate))
                audio_written = _write_audio_until(container, audio_stream, audio, audio_written, audio_end, sample_rate)
        if video_stream is None:
            return 0
        container.mux(video_stream.encode(None))
        if audio_stream is not None:
            container.mux(audio_stream.encode(None))
    return n_frames


def _write_audio_until(container, stream, audio, written: int, end: int, sample_rate: int) -> int:
    if end <= written:
        return written
    chunk = fit_to_length(audio[written:end], end - written)
    audio_frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
    audio_frame.sample_rate = sample_rate
    audio_frame.pts = written
    audio_frame.time_base = Fraction(1, sample_rate)
    container.mux(stream.encode(audio_frame))
    return end

"""Media pipeline: decode, resample, face track/crop/paste-back, speech features, encode.

A plain list of re-exports (several engineers add lines here); see each module for details.
"""
from .paths import resolve_input_path
from .audio import SPEECH_SAMPLE_RATE, load_audio, resample_audio
from .video_io import (
    MediaInfo, ReferenceVideo, iter_video_frames, load_reference_video, probe_media, reference_from_frames, write_video,
)
from .face_track import (
    FACE_CHOICES, FaceTrack, HaarFaceDetector, check_face_choice, default_face_detector, smooth_box_track, smooth_roll_track,
    track_face,
)
from .mediapipe_face import MediapipeFaceDetector, mediapipe_available
from .crop import CropTransform, crop_faces, crop_transforms, paste_back, paste_back_frame, soft_region
from .features import (
    SPEECH_FEATURE_DIM, SPEECH_FEATURE_ID, encoder_output_to_frame_features, feature_dim, frame_speech_features, speech_features,
)
from .whisper_features import WHISPER_FEATURE_DIM, WHISPER_FEATURE_ID, whisper_available

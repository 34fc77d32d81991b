"""Avatar World: procedural talking heads with known traits, and metrics that score any model.

See README.md in this folder. Public API:
"""
from .generate import ClipSpec, WorldClip, generate_world, load_clip_truth, make_clip, write_clip
from .render import FaceState, HeadRenderer, motion_track, render_background
from .speech import MouthTrack, VoiceSpec, audio_mouth_track, stressed_frames, synthesize_speech
from .traits import (DynamicTraits, Identity, SceneTraits, StaticTraits, sample_dynamic_traits,
                     sample_scene_traits, sample_static_traits)

"""Avatar World: procedural talking heads with known traits, and metrics that score any model.

See README.md in this folder. The evaluation run lives in ``suite`` (``evaluate``) and the
real-clip proxies in ``proxies``; both are imported from their modules (they pull in matplotlib
and the media face tracker only when used).
"""
from .generate import ClipSpec, WorldClip, generate_world, load_clip_truth, make_clip, write_clip
from .render import FaceState, HeadRenderer, motion_track, render_background
from .speech import MouthTrack, VoiceSpec, audio_mouth_track, stressed_frames, synthesize_speech
from .traits import (DynamicTraits, WorldPerson, SceneTraits, StaticTraits, sample_dynamic_traits,
                     sample_scene_traits, sample_static_traits)
from .metrics import (ClipMeasurements, background_error, drift, flicker, habit_error, habits, lip_sync, measure_frames,
                      score_clip, static_appearance, static_identity_error)

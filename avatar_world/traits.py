"""Every trait of an Avatar World person or scene, drawn from a seed.

Three independent groups, each from its own seed stream, so one can be changed while the others
stay bit-identical (the tests rely on this):

* ``StaticTraits``: what a single neutral frame shows (face shape, skin and its texture, eyes,
  brows, nose, teeth, hair, accessories). Drawn from ``derive_seed(identity_seed, "static")``.
* ``DynamicTraits``: how the person moves (blink rate, head sway, nods on stressed syllables,
  brow raises, smile baseline, mouth-opening gain and speed). ``derive_seed(identity_seed,
  "dynamic")``.
* ``SceneTraits``: the background, drawn from a scene seed that has nothing to do with identity.

Colours are RGB uint8 triples; lengths are fractions of the face half-width ``a`` (so the same
person renders consistently at 64 px and at 256 px).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# Palettes are lists so a trait is a small index plus jitter; names make ground truth readable.
SKIN_TONES = [(255, 224, 196), (241, 194, 160), (224, 172, 128), (198, 134, 92), (160, 102, 66),
              (122, 78, 50), (92, 58, 38), (233, 190, 170)]
HAIR_COLOURS = {"black": (28, 24, 24), "dark_brown": (70, 45, 30), "brown": (112, 74, 44),
                "auburn": (140, 60, 30), "red": (178, 80, 40), "blond": (214, 176, 104),
                "grey": (150, 148, 146), "blue_dyed": (50, 80, 170)}
EYE_COLOURS = {"brown": (96, 58, 30), "dark_brown": (60, 36, 20), "blue": (60, 120, 190),
               "green": (70, 130, 70), "grey": (120, 130, 140), "hazel": (130, 100, 50)}
TEETH_COLOURS = [(250, 250, 244), (238, 232, 208), (224, 214, 180)]
HAIR_STYLES = ("bald", "short", "side_part", "long", "bun", "curly")
SKIN_PATTERNS = ("plain", "freckles", "moles", "blotchy", "rough")
# No near-white accessory: eye whites are the blink signal the metrics read.
ACCESSORY_COLOURS = [(20, 20, 20), (120, 30, 30), (30, 60, 130), (160, 120, 40), (150, 150, 165)]
BACKGROUND_KINDS = ("flat", "gradient", "stripes", "checker", "dots", "room")


def derive_seed(seed: int, tag: str) -> int:
    """A stable 63-bit seed for one stream (identity static/dynamic, scene, clip events)."""
    digest = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32] + [ord(c) for c in tag])
    return int(digest.generate_state(2, dtype=np.uint32).astype(np.uint64).dot([1, 1 << 31]))


def _rng(seed: int, tag: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, tag))


def _jitter_colour(rng: np.random.Generator, colour, amount: float) -> tuple[int, int, int]:
    values = np.asarray(colour, dtype=np.float64) + rng.normal(0.0, amount, 3)
    return tuple(int(v) for v in np.clip(np.round(values), 0, 255))


@dataclass(frozen=True)
class StaticTraits:
    face_width: float        # face half-width a as a fraction of the frame side
    face_aspect: float       # half-height b / a
    jaw_taper: float         # 0 = round chin, 1 = narrow pointed chin
    skin_colour: tuple
    skin_pattern: str
    skin_pattern_seed: int
    eye_shape: float         # eye half-height / half-width (almond .4 … round .62)
    eye_size: float          # eye half-width / a
    eye_spacing: float       # eye centre distance from the midline / a
    eye_colour_name: str
    eye_colour: tuple
    brow_thickness: float    # / a
    brow_tilt: float         # radians, positive = outer end higher
    brow_colour: tuple
    nose_length: float       # / a
    nose_width: float        # / a
    lip_colour: tuple
    mouth_width: float       # mouth half-width at rest / a
    teeth_colour: tuple
    teeth_gap: bool
    hair_style: str
    hair_colour_name: str
    hair_colour: tuple
    glasses: bool
    glasses_colour: tuple
    glasses_round: bool
    earrings: bool
    earring_colour: tuple
    hat: bool
    hat_colour: tuple
    shirt_colour: tuple


@dataclass(frozen=True)
class DynamicTraits:
    blink_rate_per_min: float
    sway_frequency_hz: float
    sway_amplitude: float        # horizontal head translation amplitude / a
    yaw_amplitude_deg: float
    roll_amplitude_deg: float
    nod_probability: float       # chance that a stressed syllable gets a nod
    nod_amplitude_deg: float
    brow_raise_probability: float
    smile_baseline: float        # 0 … 1
    mouth_gain: float            # multiplies the audio-derived openness
    mouth_speed: float           # 0 (sluggish, heavy smoothing) … 1 (snappy)


@dataclass(frozen=True)
class SceneTraits:
    kind: str
    colour_a: tuple
    colour_b: tuple
    colour_c: tuple
    pattern_scale: float         # stripe/checker period as a fraction of the frame side
    angle_deg: float
    layout_seed: int


def sample_static_traits(identity_seed: int) -> StaticTraits:
    rng = _rng(identity_seed, "static")
    eye_name = str(rng.choice(list(EYE_COLOURS)))
    hair_name = str(rng.choice(list(HAIR_COLOURS)))
    hair_colour = _jitter_colour(rng, HAIR_COLOURS[hair_name], 10)
    skin = _jitter_colour(rng, SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], 8)
    brow_base = hair_colour if hair_name not in ("grey", "blue_dyed") else (60, 50, 45)
    return StaticTraits(
        face_width=float(rng.uniform(0.20, 0.25)),
        face_aspect=float(rng.uniform(1.18, 1.32)),
        jaw_taper=float(rng.uniform(0.0, 1.0)),
        skin_colour=skin,
        skin_pattern=str(rng.choice(SKIN_PATTERNS)),
        skin_pattern_seed=int(rng.integers(1 << 31)),
        eye_shape=float(rng.uniform(0.4, 0.62)),
        eye_size=float(rng.uniform(0.2, 0.26)),
        eye_spacing=float(rng.uniform(0.36, 0.44)),
        eye_colour_name=eye_name,
        eye_colour=_jitter_colour(rng, EYE_COLOURS[eye_name], 8),
        brow_thickness=float(rng.uniform(0.04, 0.09)),
        brow_tilt=float(rng.uniform(-0.25, 0.25)),
        brow_colour=_jitter_colour(rng, np.asarray(brow_base) * 0.8, 6),
        nose_length=float(rng.uniform(0.25, 0.4)),
        nose_width=float(rng.uniform(0.1, 0.18)),
        lip_colour=_jitter_colour(rng, np.asarray(skin) * np.array([0.8, 0.5, 0.5]), 10),
        mouth_width=float(rng.uniform(0.32, 0.42)),
        teeth_colour=TEETH_COLOURS[int(rng.integers(len(TEETH_COLOURS)))],
        teeth_gap=bool(rng.random() < 0.3),
        hair_style=str(rng.choice(HAIR_STYLES)),
        hair_colour_name=hair_name,
        hair_colour=hair_colour,
        glasses=bool(rng.random() < 0.35),
        glasses_colour=ACCESSORY_COLOURS[int(rng.integers(len(ACCESSORY_COLOURS)))],
        glasses_round=bool(rng.random() < 0.5),
        earrings=bool(rng.random() < 0.3),
        earring_colour=(222, 184, 60) if rng.random() < 0.5 else (205, 205, 215),
        hat=bool(rng.random() < 0.2),
        hat_colour=_jitter_colour(rng, ACCESSORY_COLOURS[int(rng.integers(len(ACCESSORY_COLOURS)))], 20),
        shirt_colour=tuple(int(v) for v in rng.integers(30, 220, 3)),
    )


def sample_dynamic_traits(identity_seed: int) -> DynamicTraits:
    rng = _rng(identity_seed, "dynamic")
    return DynamicTraits(
        blink_rate_per_min=float(rng.uniform(8.0, 30.0)),
        sway_frequency_hz=float(rng.uniform(0.2, 0.7)),
        sway_amplitude=float(rng.uniform(0.03, 0.16)),
        yaw_amplitude_deg=float(rng.uniform(2.0, 12.0)),
        roll_amplitude_deg=float(rng.uniform(0.5, 5.0)),
        nod_probability=float(rng.uniform(0.1, 0.8)),
        nod_amplitude_deg=float(rng.uniform(3.0, 10.0)),
        brow_raise_probability=float(rng.uniform(0.05, 0.5)),
        smile_baseline=float(rng.uniform(0.0, 0.7)),
        mouth_gain=float(rng.uniform(0.8, 1.3)),
        mouth_speed=float(rng.uniform(0.3, 1.0)),
    )


def sample_scene_traits(scene_seed: int) -> SceneTraits:
    rng = _rng(scene_seed, "scene")
    # Background colours avoid the skin-tone range's saturation/brightness band loosely but are
    # not forced away from it: robustness to a skin-coloured wall is part of the test.
    colours = [tuple(int(v) for v in rng.integers(20, 236, 3)) for _ in range(3)]
    return SceneTraits(
        kind=str(rng.choice(BACKGROUND_KINDS)),
        colour_a=colours[0], colour_b=colours[1], colour_c=colours[2],
        pattern_scale=float(rng.uniform(0.05, 0.2)),
        angle_deg=float(rng.uniform(0, 180)),
        layout_seed=int(rng.integers(1 << 31)),
    )


@dataclass(frozen=True)
class WorldPerson:
    """An Avatar World person: static appearance and dynamic habits, each from its own seed stream
    (not model.identity.Identity, which is what the model extracts from a reference video)."""
    seed: int
    static: StaticTraits
    dynamic: DynamicTraits

    @classmethod
    def from_seed(cls, identity_seed: int) -> "WorldPerson":
        return cls(identity_seed, sample_static_traits(identity_seed), sample_dynamic_traits(identity_seed))

    def with_dynamic_from(self, other: "WorldPerson") -> "WorldPerson":
        return dataclasses.replace(self, dynamic=other.dynamic)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "static": dataclasses.asdict(self.static),
                "dynamic": dataclasses.asdict(self.dynamic)}

"""Named model sizes, as data (like the size table at the bottom of facebookresearch/DiT models.py).

A config is everything needed to rebuild the network from a checkpoint: it is stored as JSON in
the checkpoint metadata, and a checkpoint is refused when its config cannot build the weights it
holds. Sizes:

| name  | hidden | depth | heads / kv heads | params | latent codec | frame | use                      |
|-------|--------|-------|------------------|--------|--------------|-------|--------------------------|
| tiny  | 128    | 4     | 4 / 2            | 1.4 M  | pixel-f4     | 32²   | CPU tests                |
| small | 512    | 12    | 8 / 2            | 73 M   | pixel-f4     | 128²  | personal avatars (Train Avatar) |
| base  | 1024   | 24    | 16 / 4           | 0.58 B | pixel-f8     | 256²  | shipped default (GPU)    |
| xl    | 2048   | 18    | 32 / 8           | 1.7 B  | pixel-f8     | 256²  | large-scale training     |

tiny's hidden size is larger than its patch (48 latent values per token, 97 input values with
the context channels): at hidden 64 the token could not carry the noise and the context through
the residual stream and the overfit test plateaued.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..errors import UserFacingError

# Mirror of media.SPEECH_FEATURE_DIM (the per-frame log-mel vector). Mirrored rather than imported
# so the model package does not load librosa at import time; tests assert the two agree.
SPEECH_FEATURE_DIM = 160
# Identifies the speech features a checkpoint was trained on; a different feature extractor gives
# vectors that mean something else even at the same width.
SPEECH_FEATURE_ID = "logmel80x2-16k-v1"
# The speech feature definitions a new model can be made for (media.frame_speech_features computes
# each): name -> (id, values per frame). Mirrors media's constants like the two above.
SPEECH_FEATURE_CHOICES = {"logmel": (SPEECH_FEATURE_ID, SPEECH_FEATURE_DIM), "whisper": ("whisper-tiny.en-enc384x2-v1", 768)}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    latent_codec: str  # codec id, see model/codecs.py ("pixel-f4", "comfy-vae:...")
    latent_channels: int  # channels of the codec's latents
    frame_size: int  # square face-crop side in pixels the model renders
    patch_size: tuple[int, int, int]  # (t, h, w) latent cells per token
    hidden: int
    depth: int
    heads: int
    kv_heads: int  # key/value heads of the static + reference branches (G = heads // kv_heads)
    static_tokens: int  # S: learned resampler queries per layer (static identity)
    block_size: int  # reference block size b for sparse routing
    top_k: int  # reference blocks each query block attends to
    audio_window: int  # speech-feature frames on EACH side of a frame that its tokens see
    speech_feature_dim: int = SPEECH_FEATURE_DIM
    speech_feature_id: str = SPEECH_FEATURE_ID
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    # Training-time behaviour (part of the config so every stage trains the same way).
    audio_dropout: float = 0.1  # probability a sample's audio is replaced by the null embedding (CFG)
    reference_dropout: float = 0.1  # probability a batch is trained without reference (CFG)
    motion_frames_prob: float = 0.5  # probability a sample conditions on known leading frames
    max_motion_frames: int = 4  # most leading frames given as motion context in training
    static_consistency_weight: float = 0.1
    timestep_mean: float = 0.0  # logit-normal t: t = sigmoid(N(mean, std))
    timestep_std: float = 1.0
    shift_base_tokens: int = 256  # tokens per frame at which the resolution shift is 1
    default_chunk_frames: int = 48
    default_overlap_frames: int = 8
    # What the network's last layer predicts: "v" (the velocity data - noise) or "x" (the clean
    # frame; Li & He 2025, "Back to Basics", JiT). Velocity prediction in pixel tokens of hundreds
    # of values per token collapses; x-prediction does not (issue "A real person"). Old
    # checkpoints have no such field and were trained as "v", hence the default.
    prediction: str = "v"
    # Space of the training loss: "v" (velocity MSE; for x-prediction with 1 - t clamped at 0.05
    # as in JiT) or "x" (clean-frame MSE: more weight on high noise, the posterior mean).
    loss_space: str = "v"
    # Channels of the pixel-space convolutional refiner after the token head (0 = none). Token
    # heads predict each patch on its own, which shows as a mosaic; 3x3 convolutions across patch
    # borders, seeing the known context pixels, remove the seams. Needs x-prediction, pixel codec.
    refiner_channels: int = 0
    # Probability that a training sample is a dub sample: the target itself is given as context
    # with the lower face (model.masks.dub_mask, jittered) hidden, as dub mode renders.
    dub_context_prob: float = 0.0
    # Weight of the lower-face latent cells (model.masks.dub_mask, the region dub mode re-renders)
    # in the flow loss, relative to the rest of the frame (1 = a plain mean). The mouth is ~15 %
    # of a face crop's cells yet carries all of the lip sync; an unweighted loss spends most of its
    # gradient on hair and background.
    mouth_loss_weight: float = 1.0
    # Fixed 2D sin-cos embedding of each token's (row, column) added to the input tokens (clip
    # and reference), as in DiT. RoPE alone is relative: at pure noise, with no context, nothing
    # tells a token where in the face it is, and renders came out as shuffled face tiles.
    absolute_positions: bool = False
    extra: dict = field(default_factory=dict)  # free-form notes (never read by the network)

    def __post_init__(self) -> None:
        problems = []
        if self.hidden % self.heads:
            problems.append(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            problems.append(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} must be even for rotary embeddings")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size must be three positive ints (t, h, w); got {self.patch_size}")
        if self.depth < 1 or self.static_tokens < 0 or self.top_k < 1 or self.block_size < 1:
            problems.append("depth, top_k and block_size must be >= 1 and static_tokens >= 0")
        if self.prediction not in ("v", "x") or self.loss_space not in ("v", "x"):
            problems.append(f"prediction and loss_space must be 'v' or 'x'; got {self.prediction!r} / {self.loss_space!r}")
        if self.refiner_channels and (self.prediction != "x" or not self.latent_codec.startswith("pixel-f")):
            problems.append("the pixel refiner (refiner_channels > 0) needs prediction='x' and a pixel-f* codec")
        if self.mouth_loss_weight <= 0:
            problems.append(f"mouth_loss_weight must be positive; got {self.mouth_loss_weight}")
        if problems:
            raise UserFacingError(f"invalid model config {self.name!r}: " + "; ".join(problems) + ".")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as error:
            raise UserFacingError(f"the checkpoint's model config is not valid JSON ({error}); the file is damaged or not a sparse-avatar checkpoint.") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserFacingError(
                f"the model config has fields this version does not know: {', '.join(unknown)}; "
                "the checkpoint was made by a newer sparse-avatar; update the pack."
            )
        data = dict(data)
        if "patch_size" in data:
            data["patch_size"] = tuple(data["patch_size"])
        try:
            return cls(**data)
        except TypeError as error:
            raise UserFacingError(f"the model config is incomplete ({error}); the checkpoint is damaged or from an incompatible version.") from None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# What the person benchmark kept for the 256² sizes: x-prediction (+3.6 dB dub-region PSNR over
# velocity prediction at the same budget, bench/results/person.md, H200), absolute token
# positions and the clean-frame loss (+2.9 and +1.4 dB generate PSNR on the 32² CPU ablation,
# bench/results/person_cpu_ablation.md). `tiny` stays as the CPU tests calibrated it (velocity
# prediction); old checkpoints carry their own config.
_PERSON_DEFAULTS = dict(prediction="x", loss_space="x", absolute_positions=True)

CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", latent_codec="pixel-f4", latent_channels=48, frame_size=32, patch_size=(1, 1, 1),
        hidden=128, depth=4, heads=4, kv_heads=2, mlp_ratio=2.0, static_tokens=8, block_size=64, top_k=4, audio_window=2,
        shift_base_tokens=64, default_chunk_frames=16, default_overlap_frames=4,
    ),
    # 128² working resolution, 16x16 tokens of 192 values: on the person benchmark (H200, same
    # runs, same steps) it beat the 256² pixel-f8 tokens of 768 values by 1.1-1.4 dB dub-region PSNR
    # and made the first renders dlib calls the same person (bench/results/person.md). The 128²
    # round trip itself keeps the dub region at 31.9 / 34.9 dB (v03 / v07).
    "small": ModelConfig(
        name="small", latent_codec="pixel-f4", latent_channels=48, frame_size=128, patch_size=(1, 2, 2),
        hidden=512, depth=12, heads=8, kv_heads=2, static_tokens=32, block_size=128, top_k=8, audio_window=4,
        **_PERSON_DEFAULTS,
    ),
    # The shipped default: `small`'s design at 19 M parameters (38 MB in bf16, inside the 40 MB a
    # repository cloned by ComfyUI Manager can carry) so that it also renders on a CPU. Trained
    # on Avatar World only (training config "world"), with dub samples, so that it dubs too.
    "compact": ModelConfig(
        name="compact", latent_codec="pixel-f4", latent_channels=48, frame_size=128, patch_size=(1, 2, 2),
        hidden=256, depth=12, heads=4, kv_heads=2, static_tokens=32, block_size=128, top_k=8, audio_window=4,
        default_chunk_frames=16, default_overlap_frames=4, dub_context_prob=0.5, **_PERSON_DEFAULTS,
    ),
    "base": ModelConfig(
        name="base", latent_codec="pixel-f8", latent_channels=192, frame_size=256, patch_size=(1, 2, 2),
        hidden=1024, depth=24, heads=16, kv_heads=4, static_tokens=64, block_size=128, top_k=8, audio_window=4,
        **_PERSON_DEFAULTS,
    ),
    "xl": ModelConfig(
        name="xl", latent_codec="pixel-f8", latent_channels=192, frame_size=256, patch_size=(1, 2, 2),
        hidden=2048, depth=18, heads=32, kv_heads=8, static_tokens=64, block_size=128, top_k=16, audio_window=4,
        **_PERSON_DEFAULTS,
    ),
}


def speech_feature_choice(choice: str) -> tuple[str, int]:
    """(feature id, values per frame) of a speech-feature name ("logmel" or "whisper")."""
    if choice not in SPEECH_FEATURE_CHOICES:
        raise UserFacingError(f"unknown speech features {choice!r}; choose one of: {', '.join(SPEECH_FEATURE_CHOICES)}.")
    return SPEECH_FEATURE_CHOICES[choice]


def with_speech_features(config: ModelConfig, choice: str) -> ModelConfig:
    """``config`` for a new model that reads ``choice`` speech features ("logmel" or "whisper")."""
    feature_id, dim = speech_feature_choice(choice)
    return config.replace(speech_feature_id=feature_id, speech_feature_dim=dim)


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise UserFacingError(f"unknown model config {name!r}; choose one of: {', '.join(CONFIGS)}.") from None

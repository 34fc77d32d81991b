"""AvatarDiT: the Sparse-Reference Diffusion Transformer, readable top to bottom.

Inputs of one denoising call (a chunk of video):
  noisy latents x_t [B, C, T, h, w], flow time t [B] (0 = noise, 1 = data), context latents and
  a context mask [B, C+1, T, h, w] (known pixels: motion frames of the previous chunk, or the
  visible part of the source in dub mode), speech features [B, T_frames, F] (one per frame), and
  an Identity-like cache: per-layer static K/V, reference K/V and block centroids.

Each block: adaLN-Zero-modulated joint attention of the clip tokens over
  [clip tokens] ∪ [static tokens] ∪ [top-k reference blocks]  (sparse_attention, Hkv heads for
  the static + reference branches), then frame-local audio cross-attention (each frame's tokens
  see a window of speech features around that frame), then an MLP.

The reference pass (``encode_reference``) runs the same blocks over the clean reference, with
attention inside each reference frame only — so its cost is linear in the reference length and
the K/V of any subset of frames equals the subset of the K/V (the static consistency loss relies
on that) — and keeps, per layer, the reference K/V and the static tokens (S learned queries that
resample all reference tokens).

Positions: 3D RoPE over (frame, row, column) of each token. Clip frames are numbered from 0 within
each chunk; reference keys carry their row/column but frame 0, because a reference frame has no
time relation to the generated clip (what a query should find there is "what this face looks
like making this sound", not "what happened n frames ago").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse_attention import reference_block_centroids, sparse_reference_attention
from .codecs import depth_to_space, space_to_depth
from .configs import ModelConfig


try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _SHORT_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
except ImportError:  # pragma: no cover - older torch: SDPA picks by itself
    sdpa_kernel = None


def _short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA for the many small problems (frame-local attention, each frame's audio window, the
    static-token resampler).

    On CUDA the cuDNN backend, when SDPA picks it, spent ~2.6 ms of host time per call on these
    shapes (H100, torch 2.11: 0.3 s a training step for `small`); flash / memory-efficient
    kernels launch in microseconds.
    """
    if q.is_cuda and sdpa_kernel is not None:
        with sdpa_kernel(_SHORT_ATTENTION_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


# torch.compile of a block (TrainerConfig.compile) stops at the sparse attention: Inductor cannot
# re-compile its hand-written Triton kernels (H200, torch 2.11: CompilationError in _fwd_kernel),
# and the kernels are already fused. The graph breaks there; norms, RoPE, modulation, the audio
# cross-attention and the MLP on either side are compiled.
@torch.compiler.disable
def _attention_outside_compile(*args, **kwargs):
    return sparse_reference_attention(*args, **kwargs)  # looked up at call time (tests spy on it)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm (torch >= 2.4, the oldest torch the pack supports): one kernel instead of five.
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


#################################################################################
#                 Embedders: timestep, speech, rotary positions                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> vector, through sinusoids and an MLP (as in DiT)."""

    def __init__(self, hidden: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class SpeechEmbedder(nn.Module):
    """Per-frame speech features -> per-token-frame windows of audio tokens.

    A token frame covering output frames [i·r, (i+1)·r) sees features of frames
    [i·r - w, (i+1)·r + w); edges repeat the first/last frame. Dropped audio (for classifier-free
    guidance) is a learned null token, not zeros, so "no audio" is a state the model knows.
    """

    def __init__(self, feature_dim: int, hidden: int, window: int, frames_per_token: int) -> None:
        super().__init__()
        self.window = window
        self.frames_per_token = frames_per_token
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.null_audio = nn.Parameter(torch.zeros(hidden))
        self.window_position = nn.Parameter(torch.randn(frames_per_token + 2 * window, hidden) * 0.02)

    def forward(self, features: torch.Tensor, token_frames: int, audio_keep: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, token_frames·r, F] -> audio tokens [B, token_frames, r + 2w, hidden]."""
        batch = features.shape[0]
        r, w = self.frames_per_token, self.window
        tokens = self.mlp(features.to(self.mlp[0].weight.dtype))
        if audio_keep is not None:
            tokens = torch.where(audio_keep[:, None, None], tokens, self.null_audio.to(tokens.dtype))
        padded = torch.cat([tokens[:, :1].expand(batch, w, -1), tokens, tokens[:, -1:].expand(batch, w, -1)], dim=1)
        starts = torch.arange(token_frames, device=features.device) * r
        index = starts[:, None] + torch.arange(r + 2 * w, device=features.device)[None]  # [T', r+2w]
        windows = padded[:, index]  # [B, T', r+2w, hidden]
        return windows + self.window_position.to(windows.dtype)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """positions [L, 3] (frame, row, col) -> rotation angles [L, head_dim/2].

    The head dim is split into a temporal and two spatial parts (each even); each part rotates by
    its own coordinate at geometrically spaced frequencies.
    """
    spatial = (head_dim // 3) // 2 * 2
    parts = (head_dim - 2 * spatial, spatial, spatial)
    angles = []
    for axis, size in enumerate(parts):
        if size == 0:
            continue
        freqs = theta ** (-torch.arange(0, size, 2, device=positions.device, dtype=torch.float32) / size)
        angles.append(positions[:, axis, None].float() * freqs[None])
    return torch.cat(angles, dim=-1)


def rope_rotation(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """angles [L, d/2] -> (cos, signed sin) [L, d] fp32, computed once per forward pass and shared
    by every layer (computing them inside apply_rope cost 2 kernels per call, 4 calls per layer).
    Channel pair (2i, 2i+1) turns by angle i: cos is repeated per pair, sin is (-sin, +sin)."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, heads, L, d], rotation (cos, signed sin) [L, d]: rotate consecutive pairs of channels,
    (even, odd) -> (even·cos - odd·sin, odd·cos + even·sin).

    Written as x·cos + pair_swapped(x)·signed_sin, every output channel one multiply-add of two
    loads, rather than splitting the pairs and stacking the two results: Inductor compiled the
    stacked form into a kernel that evaluates both halves of the stack for every element (24 loads
    for 2 stores), 2.57 ms a call over the reference pass's frame-local q and k on the H200 (`small`,
    world batch 16); this form, the same products and sums (equal to the bit on the CPU, tested),
    takes 0.98 ms (bench/results/step_probe_h200.md)."""
    cos, signed_sin = rotation
    values = x.float()
    pair_swapped = values.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (values * cos + pair_swapped * signed_sin).to(x.dtype)


def sincos_grid_embedding(rows: int, cols: int, hidden: int, device) -> torch.Tensor:
    """[rows·cols, hidden]: half the channels encode the row, half the column, each as sin/cos
    at geometrically spaced frequencies (DiT's get_2d_sincos_pos_embed), row-major like tokens."""
    quarter = hidden // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(1, quarter)))
    row = torch.arange(rows, device=device, dtype=torch.float32)[:, None] * freqs[None]  # [rows, q]
    col = torch.arange(cols, device=device, dtype=torch.float32)[:, None] * freqs[None]
    row_part = torch.cat([row.sin(), row.cos()], dim=-1)[:, None].expand(rows, cols, 2 * quarter)
    col_part = torch.cat([col.sin(), col.cos()], dim=-1)[None].expand(rows, cols, 2 * quarter)
    embedding = torch.cat([row_part, col_part], dim=-1).reshape(rows * cols, 4 * quarter)
    if embedding.shape[1] < hidden:
        embedding = torch.cat([embedding, embedding.new_zeros(rows * cols, hidden - embedding.shape[1])], dim=-1)
    return embedding


def token_positions(frames: int, rows: int, cols: int, device, *, frame_offset: int = 0, fixed_frame: bool = False) -> torch.Tensor:
    """[frames·rows·cols, 3] grid of (frame, row, col) in token order (frame-major)."""
    t = torch.zeros(frames, device=device) if fixed_frame else torch.arange(frames, device=device) + frame_offset
    grid = torch.stack(torch.meshgrid(t.float(), torch.arange(rows, device=device).float(), torch.arange(cols, device=device).float(), indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


#################################################################################
#                                 Core DiT block                                #
#################################################################################

class LayerCache:
    """What one block needs from the reference: static K/V [B, Hkv, S, d], reference K/V
    [B, Hkv, Lr, d], centroids [B, Hkv, nR, d], lengths [B]. Any of them may be None."""

    __slots__ = ("static_k", "static_v", "ref_k", "ref_v", "centroids", "ref_lengths")

    def __init__(self, static_k=None, static_v=None, ref_k=None, ref_v=None, centroids=None, ref_lengths=None) -> None:
        self.static_k, self.static_v, self.ref_k, self.ref_v = static_k, static_v, ref_k, ref_v
        self.centroids, self.ref_lengths = centroids, ref_lengths


class AvatarBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, heads, kv_heads, head_dim = config.hidden, config.heads, config.kv_heads, config.head_dim
        self.config = config
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.reference_kv = nn.Linear(hidden, 2 * kv_heads * head_dim)
        self.q_norm = RMSNorm(head_dim)  # QK-norm keeps logits bounded across clip/static/reference keys
        self.k_norm = RMSNorm(head_dim)
        self.attention_out = nn.Linear(hidden, hidden)
        # Static identity: S learned queries resample the layer's reference K/V (cost S·Lr).
        self.static_queries = nn.Parameter(torch.randn(config.static_tokens, kv_heads, head_dim) * head_dim**-0.5)
        self.static_kv = nn.Linear(kv_heads * head_dim, 2 * kv_heads * head_dim)
        self.norm_audio = nn.LayerNorm(hidden, eps=1e-6)
        self.audio_q = nn.Linear(hidden, hidden)
        self.audio_kv = nn.Linear(hidden, 2 * hidden)
        self.audio_out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    # -- pieces shared by the clip pass and the reference pass --------------------------------

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, heads, length, dim = x.shape
        return x.transpose(1, 2).reshape(batch, length, heads * dim)

    def _audio_cross_attention(self, x: torch.Tensor, audio_tokens: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """x [B, T'·N, D]; audio_tokens [B, T', W, D]: each frame's N tokens attend to its W audio tokens."""
        batch, length, hidden = x.shape
        frames, window = audio_tokens.shape[1], audio_tokens.shape[2]
        q = self.audio_q(self.norm_audio(x)).view(batch * frames, tokens_per_frame, hidden)
        k, v = self.audio_kv(audio_tokens.reshape(batch * frames, window, hidden)).chunk(2, dim=-1)
        q, k, v = (self._split_heads(t, self.heads) for t in (q, k, v))
        out = _short_attention(q, k, v)
        return self.audio_out(self._merge_heads(out).reshape(batch, length, hidden))

    def static_tokens_from_reference(self, ref_k: torch.Tensor, ref_v: torch.Tensor, ref_lengths: torch.Tensor | None = None):
        """Resample reference K/V [B, Hkv, Lr, d] into static K/V [B, Hkv, S, d]."""
        batch = ref_k.shape[0]
        queries = self.static_queries.to(ref_k.dtype).permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
        mask = None
        if ref_lengths is not None:
            mask = (torch.arange(ref_k.shape[2], device=ref_k.device)[None] < ref_lengths[:, None])[:, None, None, :]
        pooled = _short_attention(queries, ref_k, ref_v, attn_mask=mask)  # [B, Hkv, S, d]
        pooled = self._merge_heads(pooled)
        static_k, static_v = self.static_kv(pooled).chunk(2, dim=-1)
        static_k = self.k_norm(self._split_heads(static_k, self.kv_heads))
        return static_k, self._split_heads(static_v, self.kv_heads)

    # -- the two passes -------------------------------------------------------------------------

    def forward(self, x, conditioning, rotation, audio_tokens, tokens_per_frame: int, cache: LayerCache, *, backend: str = "auto", forced_blocks=None):
        """Clip pass: x [B, L, D]; conditioning [B, D] (timestep); rotation: RoPE (cos, signed sin) [L, d] (rope_rotation)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(conditioning).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        q, k, v = (self._split_heads(t, self.heads) for t in self.qkv(h).chunk(3, dim=-1))
        q = apply_rope(self.q_norm(q), rotation)
        k = apply_rope(self.k_norm(k), rotation)
        attended = _attention_outside_compile(
            q, k, v, cache.static_k, cache.static_v, cache.ref_k, cache.ref_v, cache.ref_lengths,
            centroids=cache.centroids, block_size=self.config.block_size, top_k=self.config.top_k,
            forced_blocks=forced_blocks, backend=backend,
        )
        x = x + gate_msa.unsqueeze(1) * self.attention_out(self._merge_heads(attended))
        x = x + self._audio_cross_attention(x, audio_tokens, tokens_per_frame)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def forward_reference(self, x, conditioning, rotation, audio_tokens, tokens_per_frame: int):
        """Reference pass: x [B, Tr·N, D] clean reference tokens. Attention stays inside each
        frame (linear in Tr). Returns (next x, ref_k [B, Hkv, Lr, d], ref_v)."""
        batch, length, hidden = x.shape
        frames = length // tokens_per_frame
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(conditioning).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        ref_k, ref_v = (self._split_heads(t, self.kv_heads) for t in self.reference_kv(h).chunk(2, dim=-1))
        ref_k = apply_rope(self.k_norm(ref_k), rotation)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = (self._split_heads(t.reshape(batch * frames, tokens_per_frame, hidden), self.heads) for t in (q, k, v))
        frame_rotation = tuple(part[:tokens_per_frame] for part in rotation)  # same row/col pattern in every frame, frame index 0
        q = apply_rope(self.q_norm(q), frame_rotation)
        k = apply_rope(self.k_norm(k), frame_rotation)
        attended = self._merge_heads(_short_attention(q, k, v)).reshape(batch, length, hidden)
        x = x + gate_msa.unsqueeze(1) * self.attention_out(attended)
        x = x + self._audio_cross_attention(x, audio_tokens, tokens_per_frame)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, ref_k, ref_v


class PixelRefiner(nn.Module):
    """Residual 3x3 convolutions over the predicted clean frame at full pixel resolution.

    Input per frame: the token head's prediction, the context pixels and the context mask (7
    channels). The last convolution starts at zero, so an untrained refiner is the identity.
    Works on pixel-f<N> latents, which are pixels rearranged (model/codecs.py PixelCodec).
    """

    def __init__(self, factor: int, channels: int) -> None:
        super().__init__()
        self.factor = factor
        self.net = nn.Sequential(
            nn.Conv2d(7, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, 3, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 3·f·f, T, h, w] -> [B·T, 3, h·f, w·f] in the PixelCodec layout."""
        frames = depth_to_space(latents, self.factor)  # [B, T, H, W, 3]
        return frames.permute(0, 1, 4, 2, 3).reshape(-1, 3, *frames.shape[2:4])

    def _to_latents(self, pixels: torch.Tensor, batch: int) -> torch.Tensor:
        frames = pixels.reshape(batch, -1, *pixels.shape[1:]).permute(0, 1, 3, 4, 2)  # [B, T, H, W, 3]
        return space_to_depth(frames, self.factor)

    def forward(self, predicted: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        batch = predicted.shape[0]
        dtype = self.net[0].weight.dtype
        pixels = self._to_pixels(predicted.to(dtype))
        mask = context_mask.to(dtype).permute(0, 2, 1, 3, 4).reshape(-1, 1, *context_mask.shape[-2:])
        mask = F.interpolate(mask, scale_factor=self.factor, mode="nearest")
        stacked = torch.cat([pixels, self._to_pixels(context.to(dtype)), mask], dim=1)
        return predicted + self._to_latents(self.net(stacked), batch).to(predicted.dtype)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_features: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(conditioning).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                  The model                                    #
#################################################################################

class AvatarDiT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        pt, ph, pw = config.patch_size
        channels = config.latent_channels
        self.patch_volume = pt * ph * pw
        # Input = noisy latents ++ context latents ++ context mask (dub source / motion frames).
        self.input_embed = nn.Linear((2 * channels + 1) * self.patch_volume, config.hidden)
        self.reference_embed = nn.Linear(channels * self.patch_volume, config.hidden)
        self.t_embedder = TimestepEmbedder(config.hidden)
        self.speech_embedder = SpeechEmbedder(config.speech_feature_dim, config.hidden, config.audio_window, frames_per_token=pt)
        self.blocks = nn.ModuleList(AvatarBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config.hidden, channels * self.patch_volume)
        self.refiner = PixelRefiner(int(config.latent_codec[len("pixel-f"):]), config.refiner_channels) if config.refiner_channels else None
        self.attention_backend = "auto"
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)  # Linear layers only: the refiner's convolutions keep their own init
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(block.audio_out.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- tokens <-> latents ---------------------------------------------------------------------

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T, h, w] -> [B, T'·h'·w', C·pt·ph·pw] (frame-major token order)."""
        pt, ph, pw = self.config.patch_size
        batch, channels, time, rows, cols = latents.shape
        x = latents.reshape(batch, channels, time // pt, pt, rows // ph, ph, cols // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, (time // pt) * (rows // ph) * (cols // pw), -1)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        frames, rows, cols = grid
        batch = tokens.shape[0]
        x = tokens.reshape(batch, frames, rows, cols, -1, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, -1, frames * pt, rows * ph, cols * pw)

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        time, rows, cols = latent_shape[-3:]
        pt, ph, pw = self.config.patch_size
        if time % pt or rows % ph or cols % pw:
            raise ValueError(f"latent grid {time}x{rows}x{cols} is not divisible by the patch size {self.config.patch_size}")
        return time // pt, rows // ph, cols // pw

    def _add_absolute_positions(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """x [B, T'·h'·w', D] + the (row, column) embedding of each token (config.absolute_positions)."""
        if not self.config.absolute_positions:
            return x
        frames, rows, cols = grid
        embedding = sincos_grid_embedding(rows, cols, x.shape[-1], x.device).to(x.dtype)
        return (x.view(x.shape[0], frames, rows * cols, -1) + embedding).view_as(x)

    # -- reference pass ---------------------------------------------------------------------------

    def encode_reference(self, reference_latents: torch.Tensor, reference_audio: torch.Tensor | None = None, reference_frames: torch.Tensor | None = None,
                         *, chunk_tokens: int | None = None, store_device=None):
        """Clean reference latents [B, C, Tr, h, w] (+ its own speech features [B, Tr, F]) ->
        list over layers of (ref_k, ref_v) [B, Hkv, Lr, d]. reference_frames [B] (real token
        frames of each reference in a padded batch) needs no masking here: attention is
        frame-local, so padding never touches real frames; pass the lengths in tokens to
        layer_caches, which masks them from routing, attention and the static resampler.

        chunk_tokens: run the blocks over at most this many reference tokens at a time (whole
        frames). Every operation of the pass is per frame and the audio windows are cut from the
        whole reference's, so the result is the same; the activations' memory is then bounded by
        the chunk instead of growing with the reference (a 60 s reference of `small` did not fit a
        12 GiB card in one piece). store_device: where each layer's K/V goes as it is made (the
        CPU, so a long reference's cache need not sit on the GPU during the pass)."""
        grid = self.token_grid(reference_latents.shape)
        token_frames, tokens_per_frame = grid[0], grid[1] * grid[2]
        batch, device = reference_latents.shape[0], reference_latents.device
        clean = torch.ones(batch, device=device)
        conditioning = self.t_embedder(clean)
        audio_keep = None
        if reference_audio is None:  # a reference without sound: the null audio token everywhere
            reference_audio = torch.zeros(batch, token_frames * self.config.patch_size[0], self.config.speech_feature_dim, device=device)
            audio_keep = torch.zeros(batch, dtype=torch.bool, device=device)
        audio_tokens = self.speech_embedder(reference_audio, token_frames, audio_keep)
        frames_per_chunk = token_frames if not chunk_tokens else max(1, min(token_frames, chunk_tokens // (batch * tokens_per_frame)))
        frame_patch = self.config.patch_size[0]
        pieces: list[tuple[list, list]] = [([], []) for _ in self.blocks]
        for start in range(0, token_frames, frames_per_chunk):
            stop = min(token_frames, start + frames_per_chunk)
            chunk_grid = (stop - start, grid[1], grid[2])
            chunk_latents = reference_latents[:, :, start * frame_patch:stop * frame_patch]
            x = self._add_absolute_positions(self.reference_embed(self.patchify(chunk_latents).to(self.reference_embed.weight.dtype)), chunk_grid)
            rotation = rope_rotation(rope_angles(token_positions(*chunk_grid, device, fixed_frame=True), self.config.head_dim, self.config.rope_theta))
            for index, block in enumerate(self.blocks):
                x, ref_k, ref_v = block.forward_reference(x, conditioning, rotation, audio_tokens[:, start:stop], tokens_per_frame)
                pieces[index][0].append(ref_k if store_device is None else ref_k.to(store_device))
                pieces[index][1].append(ref_v if store_device is None else ref_v.to(store_device))
        return [(keys[0], values[0]) if len(keys) == 1 else (torch.cat(keys, dim=2), torch.cat(values, dim=2)) for keys, values in pieces]

    def layer_caches(self, reference_kv, ref_lengths=None, *, static_from=None) -> list[LayerCache]:
        """Per-layer caches from reference K/V: centroids for routing and static tokens from the
        resampler. static_from: optional other reference K/V whose static tokens are used."""
        return [self.layer_cache(index, *reference_kv[index], ref_lengths, static_from=None if static_from is None else static_from[index])
                for index in range(len(self.blocks))]

    def layer_cache(self, index: int, ref_k, ref_v, ref_lengths=None, *, static_from=None) -> LayerCache:
        """One layer's cache (see layer_caches); static_from: that layer's other (K, V)."""
        block = self.blocks[index]
        source_k, source_v = (ref_k, ref_v) if static_from is None else static_from
        static_k, static_v = block.static_tokens_from_reference(source_k, source_v, ref_lengths if static_from is None else None)
        centroids = reference_block_centroids(ref_k, ref_lengths, self.config.block_size)
        return LayerCache(static_k, static_v, ref_k, ref_v, centroids, ref_lengths)

    # -- denoising pass ---------------------------------------------------------------------------

    def forward(self, noisy_latents, t, speech_features, caches, *, context_latents=None, context_mask=None, audio_keep=None, forced_blocks=None, output: str = "velocity"):
        """Velocity (output="velocity", what the samplers integrate) or the clean latents
        (output="data", what an x-prediction loss compares), whatever the network predicts:
        x_data = x_t + (1 - t)·v, both ways (config.prediction decides which one is learned).

        noisy_latents [B, C, T, h, w]; t [B] flow time (0 noise .. 1 data); speech_features
        [B, T, F] (one per frame); caches: list of LayerCache (None or empty caches = no
        reference); context_latents [B, C, T, h, w] and context_mask [B, 1, T, h, w] (1 = known);
        audio_keep [B] bool (False = null audio, for guidance). Returns velocity like noisy_latents.
        """
        batch = noisy_latents.shape[0]
        grid = self.token_grid(noisy_latents.shape)
        tokens_per_frame = grid[1] * grid[2]
        if context_latents is None:
            context_latents = torch.zeros_like(noisy_latents)
            context_mask = torch.zeros_like(noisy_latents[:, :1])
        context_latents = context_latents * context_mask  # unknown content never leaks in
        stacked = torch.cat([noisy_latents, context_latents, context_mask.to(noisy_latents.dtype)], dim=1)
        dtype = self.input_embed.weight.dtype
        x = self._add_absolute_positions(self.input_embed(self.patchify(stacked).to(dtype)), grid)
        conditioning = self.t_embedder(t.to(x.device).expand(batch) if t.dim() == 0 else t)
        audio_tokens = self.speech_embedder(speech_features.to(x.device), grid[0], audio_keep)
        rotation = rope_rotation(rope_angles(token_positions(*grid, x.device), self.config.head_dim, self.config.rope_theta))
        if not caches:
            caches = [LayerCache() for _ in self.blocks]
        for block, cache in zip(self.blocks, caches):
            x = block(x, conditioning, rotation, audio_tokens, tokens_per_frame, cache, backend=self.attention_backend, forced_blocks=forced_blocks)
        x = self.final_layer(x, conditioning)
        predicted = self.unpatchify(x, grid).float()
        sigma = (1.0 - t.float().to(x.device).expand(batch)).view(batch, 1, 1, 1, 1)
        noisy = noisy_latents.float()
        if self.config.prediction == "x":
            if self.refiner is not None:
                predicted = self.refiner(predicted, context_latents, context_mask)
            if output == "data":
                return predicted.to(noisy_latents.dtype)
            # The sampler never evaluates at t = 1; the clamp only guards a caller that does.
            return ((predicted - noisy) / sigma.clamp_min(1e-4)).to(noisy_latents.dtype)
        if output == "data":
            return (noisy + sigma * predicted).to(noisy_latents.dtype)
        return predicted.to(noisy_latents.dtype)

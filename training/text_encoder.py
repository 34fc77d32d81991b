"""A small built-in text encoder for stage 1 (scene-text-conditioned video pretraining).

Captions such as "a person with red hair in a blue room, smiling" are split into lower-case words;
each word and each of its character trigrams is hashed (crc32, stable everywhere) into one of
``n_buckets`` learned embeddings (no vocabulary file, no download, unseen words still land on
shared trigram rows). Token embeddings [B, L, D] plus a mask and a pooled vector follow the shape
of ComfyUI CONDITIONING (``[[tokens [B, L, D], {"pooled_output": [B, D]}]]``), so a large external
text encoder can replace this one by producing the same two tensors.

How text enters the DiT: the pooled embedding goes through a zero-initialised projection and is
ADDED to the DiT's timestep embedding (the adaLN conditioning vector of every block), via a
forward hook on ``dit.t_embedder`` that is active only inside ``conditioning(...)``. Zero init keeps
a pretrained DiT unchanged until the projection learns. Proposed to the model owner as an optional
``text_embeddings`` input of ``AvatarDiT.forward``; until then the hook keeps the DiT untouched.
"""
from __future__ import annotations

import contextlib
import re
import zlib

import torch
from torch import nn

_WORD = re.compile(r"[a-z0-9']+")


def tokenize(caption: str, max_words: int) -> list[list[str]]:
    """Per word: the word itself and its character trigrams (with boundary marks)."""
    words = _WORD.findall(caption.lower())[:max_words]
    pieces = []
    for word in words:
        marked = f"<{word}>"
        pieces.append([word] + [marked[i : i + 3] for i in range(len(marked) - 2)])
    return pieces


class HashedTextEncoder(nn.Module):
    def __init__(self, dim: int = 128, n_buckets: int = 4096, max_words: int = 32):
        super().__init__()
        self.dim, self.n_buckets, self.max_words = dim, n_buckets, max_words
        self.embedding = nn.EmbeddingBag(n_buckets, dim, mode="mean")
        self.position = nn.Parameter(torch.randn(max_words, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def _bucket(self, piece: str) -> int:
        return zlib.crc32(piece.encode("utf-8")) % self.n_buckets

    def forward(self, captions: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> tokens [B, L, D], mask [B, L] bool, pooled [B, D] (mean of the valid tokens)."""
        device = device or self.position.device
        tokenized = [tokenize(caption, self.max_words) for caption in captions]
        length = max(1, max(len(words) for words in tokenized))
        tokens = torch.zeros(len(captions), length, self.dim, device=device)
        mask = torch.zeros(len(captions), length, dtype=torch.bool, device=device)
        flat_ids, offsets, where = [], [], []
        for row, words in enumerate(tokenized):
            for column, pieces in enumerate(words):
                offsets.append(len(flat_ids))
                flat_ids.extend(self._bucket(p) for p in pieces)
                where.append((row, column))
        if where:
            embedded = self.embedding(
                torch.tensor(flat_ids, dtype=torch.long, device=device), torch.tensor(offsets, dtype=torch.long, device=device)
            )
            rows = torch.tensor([r for r, _ in where], device=device)
            columns = torch.tensor([c for _, c in where], device=device)
            tokens = tokens.index_put((rows, columns), embedded + self.position[columns])
            mask[rows, columns] = True
        tokens = self.norm(tokens) * mask[..., None]
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return tokens, mask, pooled

    def comfy_conditioning(self, captions: list[str]) -> list:
        """The same embeddings in ComfyUI CONDITIONING layout."""
        tokens, _, pooled = self(captions)
        return [[tokens, {"pooled_output": pooled}]]


class TextConditioner(nn.Module):
    """Encoder + zero-initialised projection into the DiT's conditioning vector (see module doc)."""

    def __init__(self, hidden: int, text_dim: int = 128, n_buckets: int = 4096):
        super().__init__()
        self.encoder = HashedTextEncoder(text_dim, n_buckets)
        self.project = nn.Linear(text_dim, hidden)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    @contextlib.contextmanager
    def conditioning(self, dit: nn.Module, captions: list[str], device):
        _, _, pooled = self.encoder(captions, device)
        added = self.project(pooled)

        def add_text(module, inputs, output):
            # The reference pass embeds a batch of the same size; both get the scene text.
            return output + added.to(output.dtype)

        handle = dit.t_embedder.register_forward_hook(add_text)
        try:
            yield
        finally:
            handle.remove()

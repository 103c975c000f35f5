"""The model's head over the last block's outputs: the final norm (and projection) and ``lm_head``, mapped to
logits or straight to the summed next-token loss. Perplexity (``evaluate``) and the last-word task (``tasks``) read a
walk's outputs through it; for a lazy model the output embedding is read in slices, never held whole.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune.lazy import InMemory


class Head:
    """The final norm (and projection) and ``lm_head`` on ``device`` for the ``with`` body: calling it maps a chunk
    of last-block outputs to logits; ``nll`` gives the summed next-token loss.

    For a lazy model, ``nll`` never holds the output embedding (a 128k x 4096 head is 1 GB in bf16): it reads the
    head in slices of rows and keeps a running log-sum-exp over them, so only one slice of logits exists at a time.
    """

    def __init__(self, model: nn.Module, device: str, weights=None, logits_bytes: int = 64 << 20):
        self.model = model
        self.final = _arch.final_modules(model)
        self.head = model.get_output_embeddings()
        self.device, self.weights = device, weights or InMemory()
        self.sliced = getattr(self.weights, "lazy", False)
        self.logits_bytes = logits_bytes
        self.cap = _arch.logit_softcap(model.config)
        self._head_loaded = False

    def __enter__(self) -> "Head":
        for m in self.final:
            self.weights.load(m, self.device)
        if not self.sliced:
            self._load_head()
        return self

    def _load_head(self) -> None:
        if not self._head_loaded:
            self.weights.load(self.head, self.device)
            self._head_loaded = True

    def __exit__(self, *exc) -> None:
        for m in [*self.final, *([self.head] if self._head_loaded else [])]:
            self.weights.unload(m)
        self._head_loaded = False

    @torch.no_grad()
    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(device=self.device, dtype=self.head.weight.dtype)
        for m in self.final:
            x = m(x)
        return x

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's soft cap on its logits (Gemma 2), in their own dtype, as the model's forward applies it."""
        return logits if self.cap is None else torch.tanh(logits / self.cap) * self.cap

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self._load_head()
        return self._capped(self.head(self._normed(hidden)))

    @torch.no_grad()
    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> float:
        """Summed cross-entropy of ``targets`` [T] under the logits of ``hidden`` [T, H] (last-block outputs)."""
        import torch.nn.functional as F

        targets = targets.to(self.device)
        if not self.sliced:
            return F.cross_entropy(self(hidden).float(), targets, reduction="sum").item()
        x = self._normed(hidden)
        vocab = self.head.weight.shape[0]
        step = max(1, self.logits_bytes // (4 * x.shape[0]))
        peak = torch.full((x.shape[0],), -math.inf, device=self.device)
        total = torch.zeros(x.shape[0], device=self.device)
        picked = torch.zeros(x.shape[0], device=self.device)
        for start in range(0, vocab, step):
            stop = min(start + step, vocab)
            w, b = self.weights.head_rows(self.model, start, stop, self.device)
            logits = self._capped(torch.nn.functional.linear(x, w, b)).float()  # [T, stop - start]
            new_peak = torch.maximum(peak, logits.max(1).values)
            total = total * torch.exp(peak - new_peak) + torch.exp(logits - new_peak[:, None]).sum(1)
            peak = new_peak
            here = (targets >= start) & (targets < stop)
            picked[here] = logits[here, targets[here] - start]
        return (peak + torch.log(total) - picked).sum().item()

    @torch.no_grad()
    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """The most likely next token [T] after each of ``hidden`` [T, H], over the head in slices for a lazy model
        (the first of equal maxima, as ``torch.argmax`` takes it)."""
        if not self.sliced:
            return self(hidden).float().argmax(-1)
        x = self._normed(hidden)
        vocab = self.head.weight.shape[0]
        step = max(1, self.logits_bytes // (4 * x.shape[0]))
        best = torch.full((x.shape[0],), -math.inf, device=self.device)
        where = torch.zeros(x.shape[0], dtype=torch.long, device=self.device)
        for start in range(0, vocab, step):
            w, b = self.weights.head_rows(self.model, start, min(start + step, vocab), self.device)
            values, idx = self._capped(torch.nn.functional.linear(x, w, b)).float().max(1)
            better = values > best  # strictly: an equal maximum in a later slice is not the first
            best = torch.where(better, values, best)
            where = torch.where(better, idx + start, where)
        return where

"""Pruning methods. Each is one module exposing ``NEEDS_DATA`` and ``prune_block(ctx)``; register it here."""

from llmprune.methods import magnitude, sparsegpt, wanda

METHODS = {
    "magnitude": magnitude,
    "wanda": wanda,
    "sparsegpt": sparsegpt,
}

"""Pruning methods. Each is one module exposing ``NEEDS_DATA`` and ``prune_block(ctx)``; register it here."""

from llmprune.methods import magnitude, sparsegpt, wanda, wandapp

METHODS = {
    "magnitude": magnitude,
    "wanda": wanda,
    "sparsegpt": sparsegpt,
    "wandapp": wandapp,
}

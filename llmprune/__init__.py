"""llmprune: prune causal language models into checkpoints that load anywhere."""

__version__ = "0.1.0"

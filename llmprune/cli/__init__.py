"""The command line: thin commands (one module each) over the library. ``app`` wires them; ``run`` is the entry
point that turns every error into one line and an exit code."""

from llmprune.cli.app import app, invoke, main, run

__all__ = ["app", "invoke", "main", "run"]

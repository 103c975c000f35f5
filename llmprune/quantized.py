"""Quantized releases: a safetensors checkpoint whose config carries a ``quantization_config`` stores some weights
packed (gpt-oss: its experts in MXFP4, 4-bit values in blocks of 32 sharing one power-of-two scale; DeepSeek-V3,
Qwen3 FP8 releases: 8-bit floats with one scale per 128 x 128 block). Pruning needs the numbers, never the packed
bytes: ``calibrate`` has transformers dequantize the methods it can dequantize on load, records what the release was
in the manifest, and writes an ordinary floating-point checkpoint; any other method is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmprune.errors import UserError

# quant_method -> the transformers config class whose ``dequantize=True`` loads it as floats (CPU included)
DEQUANTIZABLE = {"mxfp4": "Mxfp4Config", "fp8": "FineGrainedFP8Config"}


def declared(folder: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of the checkpoint in ``folder`` (None for a floating-point one)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no readable config: the loader says so in its own words
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return qc if isinstance(qc, dict) else None


def dequantizing(qc: dict[str, Any], what: str):
    """The transformers quantization config that dequantizes a checkpoint quantized as ``qc`` on load."""
    import transformers

    method = str(qc.get("quant_method", "unknown"))
    name = DEQUANTIZABLE.get(method)
    if name is None:
        raise UserError(f"{what} is quantized ({method}); llmprune prunes floating-point weights and dequantizes "
                        f"only {', '.join(sorted(DEQUANTIZABLE))} releases: use the unquantized release")
    return getattr(transformers, name)(dequantize=True)


def record(qc: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of the release's quantization: its method and settings, and that it was undone."""
    return {**{k: v for k, v in qc.items() if isinstance(v, (str, int, float, bool, list)) or v is None},
            "dequantized": True}

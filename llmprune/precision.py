"""Every dtype name llmprune knows, in one place: the names a user gives (``--dtype``, ``--act-dtype``), their
aliases, and the names safetensors stores.

A user may write ``float32``/``fp32``/``f32``, ``bfloat16``/``bf16`` or ``float16``/``fp16``/``half``; each is
recorded under its canonical name, so a recipe's fingerprint does not change with the spelling.
"""

from __future__ import annotations

import torch

from llmprune.errors import UserError

# Canonical user-facing names -> torch dtypes (what a model is computed, stored or kept in).
TORCH: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
           "half": "float16"}
NAMES = (*TORCH, *ALIASES)  # every spelling a user may give (``canonical`` also takes them in any case)

# safetensors dtype names <-> torch dtypes (the ones a checkpoint of a language model holds).
STORED: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
STORED_NAMES = {v: k for k, v in STORED.items()}
PRUNABLE = ("F64", "F32", "F16", "BF16")  # what a weight may be stored as: integers and 8-bit floats are not


# Training precision (regularize, recover --precision): the forward and backward passes under bf16 autocast, the
# weights, gradients and AdamW state in fp32 (mixed precision; half-precision weights drift under AdamW's small
# updates). ``auto`` is bf16 on CUDA, where tensor cores make it about twice as fast, and fp32 on the CPU, where a
# CPU without bf16 units runs it slower (benchmarks/README.md, Wanda++ --ro-dtype bf16).
TRAINING_PRECISIONS = ("auto", "fp32", "bf16")


def training_precision(asked: str, device: str) -> str:
    """``fp32`` or ``bf16``: ``asked`` (auto, fp32, bf16 and their aliases) on the resolved ``device``."""
    if asked == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    name = canonical(asked, "--precision")
    if name not in ("float32", "bfloat16"):
        raise UserError(f"--precision {asked}: use auto, fp32 or bf16 (fp16 would need loss scaling)")
    return {"float32": "fp32", "bfloat16": "bf16"}[name]


def canonical(name: str, flag: str = "--dtype", auto: bool = False) -> str:
    """``name`` as its canonical spelling (``bf16`` -> ``bfloat16``); ``auto`` passes where the option takes it.
    Anything else is a one-line error naming ``flag`` and what it accepts."""
    key = str(name).strip().lower()
    if auto and key == "auto":
        return "auto"
    key = ALIASES.get(key, key)
    if key not in TORCH:
        accepted = (["auto"] if auto else []) + [*TORCH, *ALIASES]
        raise UserError(f"unknown {flag} '{name}'; use {', '.join(accepted)}")
    return key


def to_torch(name: str) -> torch.dtype | str:
    """The torch dtype of a name (``"auto"`` stays ``"auto"``: the checkpoint's own)."""
    key = canonical(name, auto=True)
    return key if key == "auto" else TORCH[key]

"""FSDP for the training steps: each process holds a shard of every weight, gradient and AdamW moment.

``regularize`` and ``recover`` train every weight of the model (DReSS trains the whole model), so at 7B the
weights, gradients and optimizer state (about 16 bytes a parameter) do not fit one device. Under
``accelerate launch --config_file llmprune/configs/fsdp.yaml`` (accelerate sets ``ACCELERATE_USE_FSDP``) the steps
shard the model with PyTorch's FSDP2 (``fully_shard``: each decoder block one unit, the rest of the model the root
unit; every parameter split along its first dimension in ``ceil(n / processes)``-row chunks), which runs on gloo
(CPU) and NCCL alike -- accelerate 1.15 only turns FSDP on for accelerator devices, so the sharding is done here and
accelerate keeps the process group, the data sharding and the mixed precision.

The steps keep working on plain modules: ``shard`` trains a copy of the model that *shares* its parameters until
they are sharded (no weights copied; the originals' storage is then released), and ``gather`` writes the trained
full weights back into the original parameters, so what the step saves, merges and verifies afterwards is the
model it loaded, whole on every process (as after a DDP run). The penalty and the pattern masks act on each
process's local rows (``local``), their norms summed over processes (``sum_over_processes``).
"""

from __future__ import annotations

import copy
import math
import os
import sys

import torch
from torch import nn


CONFIG = os.path.join(os.path.dirname(__file__), "configs", "fsdp.yaml")  # accelerate launch --config_file


def requested() -> bool:
    """Whether the launch asks for FSDP (accelerate's environment for a ``distributed_type: FSDP`` config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def config_problem() -> str | None:
    """Why the launch's FSDP settings cannot be honoured (None when they can). Only FSDP2's per-parameter sharding
    is implemented: an FSDP1 configuration (flat parameters, its sharding strategies) would be silently different."""
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        return (f"the launch asks for FSDP version {version}; llmprune shards with FSDP2 (set fsdp_version: 2, as "
                "llmprune/configs/fsdp.yaml does)")
    if processes() < 2:
        return "FSDP needs at least 2 processes (accelerate launch --num_processes N)"
    if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
        return "fsdp_activation_checkpointing is the steps' --grad-checkpointing: set that instead"
    return None


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() == "true"


def is_sharded(p: torch.Tensor) -> bool:
    # torch.distributed.tensor costs half a second to import; no tensor can be a DTensor before someone imported it
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(p, dtensor.DTensor)


def local(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(the rows this process holds, the index of its first row)``: a sharded parameter's local chunk (a view:
    writing it writes the parameter), or a whole tensor and 0."""
    if not is_sharded(p):
        return p.data, 0
    t = p.to_local().detach()  # the same storage: in-place writes reach the parameter
    n, mesh = p.shape[0], p.device_mesh
    chunk = math.ceil(n / mesh.size())
    start = min(mesh.get_local_rank() * chunk, n)
    if t.shape[0] != min(chunk, n - start):  # FSDP2 chunks like torch.chunk along dim 0; anything else is not ours
        raise RuntimeError(f"unexpected FSDP shard: {t.shape[0]} rows at {start} of {n}")
    return t, start


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every process must call it, in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def like(whole: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``whole`` (a full tensor shaped as ``p``) as ``p`` holds it: this process's rows of it when ``p`` is sharded."""
    if not is_sharded(p) or whole.shape != p.shape:
        return whole.to(p.device)
    from torch.distributed.tensor import DTensor  # loaded already: p is one

    t, start = local(p)
    return DTensor.from_local(whole[start:start + t.shape[0]].to(t.device), p.device_mesh, p.placements,
                              run_check=False, shape=p.shape, stride=p.stride())


def sum_over_processes(t: torch.Tensor, sharded: bool) -> torch.Tensor:
    """Partial sums of each process's rows summed over the processes (in place); a no-op for whole tensors."""
    if sharded and processes() > 1:
        torch.distributed.all_reduce(t)
    return t


def shard(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> nn.Module:
    """A sharded copy of ``model`` to train (module docstring). ``blocks``: the decoder blocks, one FSDP unit each.
    The originals' storage is released: the weights live in the shards until ``gather``. The launch's
    ``fsdp_reshard_after_forward`` (default true: a block's whole weights live only while it computes) and
    ``fsdp_offload_params`` (the shards, their gradients and AdamW state in CPU memory) are honoured."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    settings = dict(reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
                    offload_policy=CPUOffloadPolicy() if _flag("FSDP_OFFLOAD_PARAMS") and device.type != "cpu"
                    else OffloadPolicy())

    # deepcopy with every parameter and buffer mapped to itself: the module tree is copied, no tensor is copied
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo)
    names = {id(m): n for n, m in model.named_modules()}
    twin_modules = dict(twin.named_modules())
    twin_blocks = [twin_modules[names[id(b)]] for b in blocks]
    mesh = init_device_mesh(device.type, (processes(),))
    # Each unit's whole weights are released as soon as its shards exist (fully_shard moves them to the device
    # first: at most one unit is there whole); the originals are empty until gather.
    for block, original in zip(twin_blocks, blocks):
        fully_shard(block, mesh=mesh, **settings)
        _release(original.parameters())
    fully_shard(twin, mesh=mesh, **settings)
    _release(model.parameters())
    return twin


def _release(params) -> None:
    for p in params:
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def record(twin: nn.Module) -> dict:
    """What this process holds of the sharded twin: the evidence, in the step's record, that the model was sharded."""
    return {"processes": processes(), "parameters": sum(p.numel() for p in twin.parameters()),
            "parameters_held": sum(local(p)[0].numel() for p in twin.parameters())}


@torch.no_grad()
def gather(twin: nn.Module, model: nn.Module) -> None:
    """Write the trained weights of the sharded ``twin`` back into ``model``'s parameters, whole, on every process
    (one collective per parameter, in the same order everywhere)."""
    trained = dict(twin.named_parameters(remove_duplicate=False))
    for name, p in model.named_parameters(remove_duplicate=False):
        p.data = full(trained[name].detach()).clone()  # on the training device, as after a DDP run

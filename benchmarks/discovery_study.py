"""How far a generic description of a decoder block goes: every causal-LM family transformers ships, read from its
module tree alone.

For each model type of ``AutoModelForCausalLM`` in the installed transformers, the model is built on the ``meta``
device from its default config with two blocks (no weights, no memory), its decoder blocks found (the ``ModuleList``
of two blocks holding the most parameters), and every tensor of two or more dimensions in either block sorted into
(a family whose default config makes its first blocks dense -- DeepSeek-V3's ``first_k_dense_replace`` is 3 -- shows
no experts here):

- ``linear``: the weight of an ``nn.Linear`` -- what llmprune's methods prune, input captured by a hook;
- ``experts``: a 3-D parameter of a module named ``experts`` (routed experts stored per expert: each slice a Linear
  once the table says its layout);
- ``declared``: what a name pattern can declare never pruned -- a router's weight (a module or parameter named
  ``gate`` or ``router``), a convolution kernel (``conv`` in its name);
- ``other``: anything else (transformers' transposed ``Conv1D`` of GPT-2, state-space parameters, per-expert biases,
  embeddings inside blocks, ...), which a generic description cannot prune or pass over without knowing what it is.

A family whose blocks hold only ``linear`` (and ``declared``) tensors needs nothing hand-written to find and prune
its weights (every method and N:M pattern); what stays hand-written is where its blocks and final norm are, and the
coupling of the structured removals. The study prints counts and the families per class, and which of them the
architecture table describes.

    python benchmarks/discovery_study.py          # about 2 minutes
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prune_bench import save_results  # noqa: E402


def probe(model_type: str) -> dict:
    """What the blocks of ``model_type``'s default model (two blocks, on ``meta``) hold."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    row: dict = {"model_type": model_type}
    try:
        config = AutoConfig.for_model(model_type, num_hidden_layers=2)  # per-block lists made for two blocks
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # a default config that does not build (needs a library, a field left unset, ...)
        return {**row, "class": "no skeleton", "why": f"{type(e).__name__}: {str(e).strip()[:80]}"}
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == 2]
    if not lists:
        return {**row, "class": "no blocks found"}
    path, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    linear = {id(m.weight) for m in blocks.modules() if isinstance(m, nn.Linear)}
    kinds: dict[str, list[str]] = {"linear": [], "experts": [], "declared": [], "other": []}
    seen = set()
    for name, p in ((n.split(".", 1)[1], p) for n, p in blocks.named_parameters()):  # both blocks: one may be dense
        if p.dim() < 2 or name in seen:
            continue
        seen.add(name)
        owner = name.rpartition(".")[0]
        parts = set(owner.split("."))
        kind = ("linear" if id(p) in linear and not parts & {"gate", "router"} and "conv" not in name
                else "experts" if p.dim() == 3 and owner.endswith("experts")
                else "declared" if parts & {"gate", "router"} or "conv" in name else "other")
        kinds[kind].append(name)
    cls = "other" if kinds["other"] else "linear + experts" if kinds["experts"] else "linear only"
    return {**row, "class": cls, "blocks": path, **{k: len(v) for k, v in kinds.items() if k != "other"},
            "other": kinds["other"][:4]}


def main() -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from llmprune.arch import ARCHS

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    rows = []
    types = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for i, mt in enumerate(types, 1):
        rows.append({**probe(mt), "in_table": mt in ARCHS})
        print(f"{i}/{len(types)} {mt}: {rows[-1]['class']}", flush=True)
    classes = ["linear only", "linear + experts", "other", "no blocks found", "no skeleton"]
    lines = ["| blocks hold | families | of them in the table | examples |", "|---|---|---|---|"]
    for cls in classes:
        got = [r for r in rows if r["class"] == cls]
        if got:
            lines.append(f"| {cls} | {len(got)} | {sum(r['in_table'] for r in got)} | "
                         f"{', '.join(r['model_type'] for r in got[:12])}{' ...' if len(got) > 12 else ''} |")
    other = [r for r in rows if r["class"] == "other"]
    lines += ["", "Tensors a generic description cannot place (the first four of each family):", ""]
    lines += [f"- {r['model_type']}: {', '.join(r['other'])}" for r in other]
    table = "\n".join(lines)
    caption = (f"# Discovery study: the blocks of every causal-LM family of transformers {transformers.__version__}\n\n"
               "Default configs with two blocks, built on the meta device (`python benchmarks/discovery_study.py`).")
    save_results(Path(__file__).parent / "results", "discovery", rows, caption, table)


if __name__ == "__main__":
    main()

"""``calibrate``: a new workdir from a model source and calibration windows of a dataset."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from llmprune import precision
from llmprune.errors import UserError
from llmprune.modeling import check_shard_size
from llmprune.options import REQUIRED, at_least_two, check_all, option, positive, text_field_option
from llmprune.steps import KINDS
from llmprune.steps.base import Step
from llmprune.workdir import Workdir, check_fresh, remove_scaffolding

DEFAULT_SEQLEN = 2048
_DTYPES = ("auto", *precision.TORCH)  # shown and completed; the aliases (bf16, ...) are accepted too


@dataclass(frozen=True)
class CalibrateOptions:
    """What ``llmprune calibrate`` was asked for; recorded as the step's parameters, in this order (``force`` is
    not a parameter of the result)."""

    model: str = option(REQUIRED, "Hub id, local HF folder, or .gguf file.")
    dataset: str = option(REQUIRED, "wikitext2, c4, ptb, hf:NAME[:CONFIG[:SPLIT]], or a .txt/.jsonl/.json/.parquet "
                          "file.")
    samples: int = option(128, "Number of calibration windows.", check=positive)
    seqlen: Optional[int] = option(None, f"Tokens per window (default: {DEFAULT_SEQLEN}, or the model's context when "
                                   "it is shorter).", check=at_least_two, show_default=False)
    seed: int = option(0, "Seed of the window positions.")
    revision: Optional[str] = option(None, "Hub revision (branch, tag or commit).")
    dtype: str = option("auto", "auto (the checkpoint's own), float32, bfloat16 or float16 (also fp32, bf16, fp16).",
                        choices=_DTYPES, strict=False)
    text_field: str = text_field_option()
    trust_remote_code: bool = option(False, "Allow code from the model repository to run.")
    text_only: bool = option(False, "Take the language model of a vision-language release (Qwen3.5, Llama 4, Gemma "
                             "4) alone; its vision and audio towers are not kept.")
    max_shard_size: str = option("2GB", "Largest safetensors shard.")
    keep_teacher: bool = option(True, "Keep the model as calibrated in WORK/teacher/ (hard links: no extra space "
                                "until a step replaces the model) for --distill.")
    force: bool = option(False, "Overwrite an existing workdir.")

    def params(self) -> dict[str, Any]:
        p = asdict(self)
        del p["force"]
        return p


def run(ws: Workdir, o: CalibrateOptions) -> dict[str, Any]:
    """Bring the model in as safetensors shards and draw the calibration windows; returns the step's metrics plus
    the model type."""
    from llmprune import data

    check_all(o)
    check_shard_size(o.max_shard_size)
    _check_memory(o.samples, o.seqlen or DEFAULT_SEQLEN)
    o = replace(o, dtype=precision.canonical(o.dtype, "--dtype", auto=True))  # recorded canonically: bf16 -> bfloat16
    check_fresh(ws.path, o.force, {k: v for k, v in o.params().items() if not (k == "seqlen" and v is None)})
    text = data.load_text(o.dataset, "calibration", o.text_field)  # before the model: fail fast on bad data
    new = not ws.path.exists()
    try:
        return _calibrate(ws, o, text)
    except BaseException:
        if new:
            remove_scaffolding(ws.path)  # a failed first calibrate leaves no folder behind
        raise


def _check_memory(samples: int, seqlen: int) -> None:
    """The windows alone (int64 token ids) must fit in a fraction of this machine's memory; every later step holds
    activations of that many tokens too."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    need = samples * seqlen * 8
    if need > ram // 4:
        raise UserError(f"--samples {samples:,} x --seqlen {seqlen:,} tokens need {need / 2**30:,.1f} GiB for the token "
                        f"ids alone, more than a quarter of this machine's {ram / 2**30:,.0f} GiB; ask for fewer")


def _calibrate(ws: Workdir, o: CalibrateOptions, text: str) -> dict[str, Any]:
    from safetensors.torch import save_file

    from llmprune import data, validate
    from llmprune.errors import UserError
    from llmprune.modeling import check_context, param_count, resolve_source

    src = resolve_source(o.model, o.revision)
    with ws.step("calibrate", o.params(), create={}) as tx:
        out = tx.stage("model")
        # A safetensors source (a folder, a Hub snapshot) is copied tensor by tensor, never held whole; a GGUF
        # file, or a quantized release, is dequantized by transformers, which loads it whole.
        lm, tok, base, write = (_load_gguf if src.kind == "gguf" else _open_safetensors)(src, o, out)
        validate.check_vocabulary(len(tok), lm.get_input_embeddings().weight.shape[0], f"model {o.model}", UserError)
        if o.seqlen is None:  # the default fits the model: a 1024-token model gets 1024-token windows
            context = getattr(lm.config, "max_position_embeddings", None) or DEFAULT_SEQLEN
            o = replace(o, seqlen=min(DEFAULT_SEQLEN, context))
            tx.step.params = o.params()
        check_context(lm, o.seqlen)
        ids = data.tokenize(tok, text)
        starts = ids.numel() - o.seqlen
        if starts > 0 and o.samples > starts:
            raise UserError(f"--samples {o.samples:,} windows of {o.seqlen} tokens: {o.dataset} has {ids.numel():,} "
                            f"tokens, so at most {starts:,} distinct windows; ask for fewer")
        windows = data.random_windows(ids, o.samples, o.seqlen, o.seed)
        tx.manifest.update({
            "base_model": base,
            "model_type": base["model_type"],
            "calibration": {"source": o.dataset, "seed": o.seed, "samples": o.samples, "seqlen": o.seqlen,
                            "source_tokens": ids.numel(), "file": "calib/windows.safetensors"},
        })
        write()
        tok.save_pretrained(out)
        if o.keep_teacher:
            keep_teacher(tx, out)
        calib = tx.stage("calib")
        calib.mkdir()
        # One metadata key: safetensors writes a metadata map in no fixed order, and the file's hash must be
        # reproducible (a re-run of a recipe compares hashes).
        meta = json.dumps({"source": o.dataset, "seed": o.seed, "seqlen": o.seqlen}, sort_keys=True)
        save_file({"input_ids": windows.contiguous()}, calib / "windows.safetensors", metadata={"llmprune": meta})
        tx.step.metrics = {"parameters": param_count(lm), "source_tokens": ids.numel(),
                           "windows": list(windows.shape)}
    return {"model_type": base["model_type"], **tx.step.metrics}


def keep_teacher(tx, model_dir) -> None:
    """``teacher/``: hard links of the model files just written, so the dense model stays available to distil from
    (``recover --distill``) at no cost in space until a step replaces ``model/``, then at the cost of one copy of the
    model as calibrated. Hashed once for both names."""
    import os

    from llmprune.distill import TEACHER
    from llmprune.fsio import sha256_file

    teacher = tx.stage(TEACHER)
    for p in sorted(model_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(model_dir)
            (teacher / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, teacher / rel)
            except OSError:  # a filesystem without hard links (or across devices): a copy, the space it costs
                import shutil

                shutil.copy2(p, teacher / rel)
            digest = sha256_file(p)
            tx.known[f"{model_dir.name}/{rel.as_posix()}"] = tx.known[f"{TEACHER}/{rel.as_posix()}"] = digest


def _load_gguf(src, o: CalibrateOptions, out):
    from pathlib import Path

    from llmprune import provenance, validate
    from llmprune.modeling import load_source, non_finite, save_model

    lm, tok, base = load_source(o.model, o.revision, o.dtype, o.trust_remote_code)
    base.update(provenance.of_gguf(Path(src.where)))
    validate.refuse_non_finite_source(*non_finite(lm), f"model {o.model}")
    return lm, tok, base, lambda: save_model(lm, tok, out, o.max_shard_size)


def _check_config(folder, o: CalibrateOptions) -> None:
    """A family llmprune describes, with a config that describes itself sanely (what ``Lazy`` checks on a streamed
    source, for one loaded whole)."""
    from transformers import AutoConfig

    from llmprune import validate
    from llmprune.arch import MULTIMODAL, arch_for
    from llmprune.errors import first_line

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=o.trust_remote_code)
    except Exception as e:  # whatever a damaged config.json raises: one line
        raise UserError(f"cannot read the config of model {o.model}: {first_line(e)}") from None
    if config.model_type in MULTIMODAL:
        raise UserError(f"model {o.model} is a quantized vision-language release ({config.model_type}); its language "
                        "model is not read from a quantized checkpoint yet: use the unquantized release")
    arch_for(config.model_type)
    validate.check_config(config, f"model {o.model}", UserError)


def _open_safetensors(src, o: CalibrateOptions, out):
    from pathlib import Path

    from transformers import AutoTokenizer

    from llmprune import provenance, quantized, validate
    from llmprune.lazy import Lazy
    from llmprune.modeling import copy_weights, hub_snapshot, load_source, non_finite, quiet_transformers, save_model

    quiet_transformers()
    folder = Path(src.where) if src.kind == "folder" else hub_snapshot(src.where, o.revision)
    base = dict(src.base)
    if src.kind == "hub":
        base["commit"] = folder.name  # the snapshot folder is named by the commit it holds
    base.update(provenance.of_folder(folder, src.where if src.kind == "hub" else None))
    if quantized.declared(folder) is not None:  # packed weights: transformers dequantizes them, loading the model whole
        _check_config(folder, o)  # before minutes of loading and dequantizing
        lm, tok, loaded = load_source(str(folder), None, o.dtype, o.trust_remote_code)
        base.update(model_type=loaded["model_type"], quantization=loaded["quantization"])
        validate.refuse_non_finite_source(*non_finite(lm), f"model {o.model}")
        return lm, tok, base, lambda: save_model(lm, tok, out, o.max_shard_size)
    lazy = Lazy(folder, error=UserError, text_only=o.text_only)
    if lazy.multimodal is not None:
        base["multimodal"] = {"model_type": lazy.release_type, "kept": "language model"}
    if lazy.dropped:  # towers of a vision-language release, multi-token-prediction blocks the model class ignores
        base["tensors_not_kept"] = len(lazy.dropped)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=o.trust_remote_code)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer of model {o.model}: {msg[:300]}") from None
    base["model_type"] = lazy.model.config.model_type
    return lazy.model, tok, base, lambda: copy_weights(lazy, out, o.dtype, o.max_shard_size, f"model {o.model}")


STEP = Step("calibrate", CalibrateOptions, run, "Start a workdir: bring in a model and calibration windows of a dataset.",
            kind=KINDS["calibrate"])

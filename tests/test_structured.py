"""Structured removal and DReSS on tiny models: exactness, loadability, parameter counts, the penalty and shrink."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from conftest import cli, killed_at_evaluation
from llmprune import structured as S
from llmprune import surgery
from llmprune.arch import arch_for
from llmprune import penalty, selection
from llmprune.modeling import param_count

PLANS = {  # tiny models: hidden 64, 4 heads, 2 layers, MLP 128; KV groups 2 (phi and opt: 4)
    "hidden": [1, 5, 7, 63],  # 60 left: still a multiple of the 4 heads, which LlamaConfig validates
    "heads": [[0], [1]],
    "mlp": [[0, 3, 5, 127], [2, 9, 11, 64]],
    "layers": [0],
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _cases():
    for arch in tiny.ARCH_TYPES:
        for structure in S.STRUCTURES:
            if structure == "experts":
                continue  # zeroing an expert is not removing it (its router logit stays): tests/test_expert_removal.py
            if structure in dict(arch_for(arch).parts.cannot):
                # refused (OPT: hidden, heads; OLMo 3: heads; DeepSeek-V3: heads), see test_refusals_in_the_table;
                # MoE: all but heads and experts, see test_moe_refuses_structured_removal
                continue
            yield arch, structure


@pytest.mark.parametrize("arch,structure", list(_cases()))
def test_removing_zeroed_units_gives_the_zeroed_models_logits(tiny_root, tmp_path, arch, structure):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch).eval()
    plan = S.Plan(structure, PLANS[structure])
    S.zero(model, plan)
    ids = torch.randint(0, tiny.VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    small = surgery.remove(model, plan)
    out = _logits(small, ids)
    assert param_count(small) < param_count(model)
    if structure == "hidden" and not arch_for(arch).parts.rms_norm:
        # LayerNorm statistics change with the width: not exact (docs/methods.md), but the model must still run.
        assert out.shape == ref.shape and torch.isfinite(out).all()
    else:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # The saved model is a standard checkpoint: plain from_pretrained, no remote code, the same function.
    small.save_pretrained(tmp_path / "small", safe_serialization=True)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "small", trust_remote_code=False).eval()
    torch.testing.assert_close(_logits(back, ids), out, atol=0, rtol=0)


def test_parameter_count_is_analytic(tiny_root):
    """llama tiny: V=384 (tied), d=64, 4 heads x 16, 2 KV groups, MLP 128, 2 layers."""
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "llama")
    V, d, H, hd, KV, I, L = 384, 64, 4, 16, 2, 128, 2

    def count(d, H, KV, I, L):
        attn = d * H * hd * 2 + d * KV * hd * 2  # q, o and k, v
        return V * d + L * (attn + 3 * d * I + 2 * d) + d

    assert param_count(model) == count(d, H, KV, I, L)
    g = S.geometry(model)
    for structure, ratio, expected in (
        ("hidden", 0.25, count(48, H, KV, I, L)),
        ("heads", 0.5, count(d, H - 2, KV - 1, I, L)),
        ("mlp", 0.25, count(d, H, KV, 96, L)),
        ("layers", 0.5, count(d, H, KV, I, 1)),
    ):
        plan = selection.select(model, structure, ratio, "tail", None)
        assert plan.meta["units"] == S.count_removed(g, structure, ratio)
        assert param_count(surgery.remove(model, plan)) == expected, structure


def test_ratio_zero_is_the_identity(tiny_root):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "qwen3").eval()
    ids = torch.randint(0, tiny.VOCAB, (1, 16))
    for structure in [s for s in S.STRUCTURES if s != "experts"]:  # a dense model has no experts to remove
        plan = selection.select(model, structure, 0.0, "random", None)
        assert plan.n_units == 0
        same = surgery.remove(model, plan)
        assert param_count(same) == param_count(model)
        torch.testing.assert_close(_logits(same, ids), _logits(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("arch,structure,why", [("opt", "hidden", "ties the attention width"),
                                               ("opt", "heads", "ties the attention width"),
                                               ("olmo3", "heads", "normalise across all heads"),
                                               ("olmo3", "hidden", "near the norm's eps"),
                                               ("deepseek_v3", "heads", "latent projections"),
                                               ("deepseek_v3", "hidden", "latent projections")])
def test_refusals_in_the_table(tiny_root, arch, structure, why):
    from llmprune.errors import UserError

    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch)
    with pytest.raises(UserError, match=why):
        surgery.remove(model, S.Plan(structure, PLANS[structure]))


# Gemma 4 runs its experts beside a dense MLP, whose channels are removed as in any model (the zeroed-units test
# above); its other refusals have reasons of their own (tests/test_families.py).
@pytest.mark.parametrize("arch", [a for a in tiny.MOE_TYPES if a != "gemma4_text"])
def test_moe_refuses_structured_removal(tiny_root, arch):
    from llmprune.errors import UserError

    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch)
    for structure in ("hidden", "mlp"):  # heads, experts and whole blocks are removed (the zeroed-units test)
        with pytest.raises(UserError, match="mixture-of-experts"):
            surgery.remove(model, S.Plan(structure, PLANS[structure]))


@pytest.mark.parametrize("arch,key,before,after", [("qwen3_moe", "mlp_only_layers", [1], [0]),
                                                   ("deepseek_v3", "first_k_dense_replace", 1, 0),
                                                   ("llama4_text", "moe_layers", [1], [0])])
def test_removing_a_block_keeps_the_config_placing_the_dense_and_sparse_blocks(tiny_root, arch, key, before, after):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch)
    assert getattr(model.config, key) == before
    small = surgery.remove(model, S.Plan("layers", [0]))
    assert getattr(small.config, key) == after  # the dense (or sparse) block that stays is still one


def test_a_periodic_sparse_block_pattern_refuses_block_removal(tiny_root):
    from llmprune.errors import UserError

    model = AutoModelForCausalLM.from_pretrained(tiny_root / "qwen3_moe")
    model.config.decoder_sparse_step = 2
    with pytest.raises(UserError, match="period of 2 blocks"):
        surgery.remove(model, S.Plan("layers", [0]))


def test_activation_selection_is_deterministic_and_keeps_the_loud_channels(tiny_root):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "llama").eval()
    windows = torch.randint(0, tiny.VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] *= 50  # a channel carrying a lot of the residual stream
    a = selection.select(model, "hidden", 0.5, "activation", windows)
    b = selection.select(model, "hidden", 0.5, "activation", windows)
    assert a.removed == b.removed and len(a.removed) == 32 and 3 not in a.removed
    heads = selection.select(model, "heads", 0.5, "activation", windows)
    assert [len(r) for r in heads.removed] == [1, 1]
    layers = selection.select(model, "layers", 0.5, "tail", windows)
    assert layers.removed == [0]  # the tail before the final block


@pytest.mark.parametrize("norm", penalty.NORMS)
def test_proximal_shrink_reaches_exact_zeros(tiny_root, norm):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "llama")
    plan = S.Plan("hidden", PLANS["hidden"])
    pen = penalty.Penalty(model, plan, norm)
    assert pen.relative_norm() == pytest.approx(1.0)
    assert pen.loss(0.3).item() == pytest.approx(0.3)  # normalised: the penalty starts at lambda
    norms = []
    for _ in range(10 if norm != "l1" else 400):
        pen.shrink(0.1)
        norms.append(pen.relative_norm())
    assert all(b <= a + 1e-7 for a, b in zip(norms, norms[1:]))
    if norm == "l1":
        assert norms[-1] < 1e-6
    else:
        assert norms[9] == 0.0  # group / per-slice soft-thresholding: zero after 1 / lambda steps
    # Only the selected slices moved, and they are (all but) zero.
    expected = AutoModelForCausalLM.from_pretrained(tiny_root / "llama")
    S.zero(expected, plan)
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0, msg=name)


def test_zeroed_context_restores_the_weights(tiny_root):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "phi")
    before = [p.detach().clone() for p in model.parameters()]
    pen = penalty.Penalty(model, S.Plan("heads", PLANS["heads"]), "group")
    with pen.zeroed():
        assert pen.relative_norm() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_regularize_then_prune_beats_direct_removal(calibrated, tiny_root, tmp_path):
    """On a tiny model: regularisation drives the selected channels to zero, so removal costs (almost) nothing
    on held-out windows, while removing the same channels directly costs more; the plans are the same channels."""
    import shutil

    wd = calibrated("llama", samples=24, seqlen=64)
    direct = tmp_path / "direct"
    shutil.copytree(wd, direct)
    code, reg = cli("regularize", wd, "--ratio", 0.25, "--steps", 30, "--lr", 1e-3, "--lambda", 0.05,
                    "--batch-size", 4, "--holdout", 4, "--eval-every", 10)
    assert code == 0
    before, after = reg["before"], reg["evals"][-1]
    # Zeroing the channels changed the held-out perplexity before (either way: a random model's), not after.
    assert after["relative_norm"] == 0.0 and abs(after["gap"]) < 1e-6 < abs(before["gap"])
    assert reg["peak_rss_mib"] > 0 and reg["steps"] == 30
    code, pr = cli("prune", wd, "--method", "dress")
    assert code == 0 and pr["regularized"] and pr["geometry"]["hidden"] == 48
    code, dr = cli("prune", direct, "--method", "dress", "--ratio", 0.25)
    assert code == 0 and not dr["regularized"] and dr["parameters"] == pr["parameters"]
    assert sorted(dr["plan"]["removed"]) == sorted(pr["plan"]["removed"])  # the same channels: the control
    ev = [cli("eval", w, "--dataset", tiny_root / "heldout.txt", "--seqlen", 64)[1]["perplexity"] for w in (wd, direct)]
    assert ev[0] < ev[1]
    # The plan is spent: a second dress prune selects anew instead of reusing it.
    code, again = cli("prune", wd, "--method", "dress", "--ratio", 0.1)
    assert code == 0 and not again["regularized"]


def test_regularize_until_converged_stops_early(calibrated):
    wd = calibrated("qwen2", samples=12, seqlen=32)
    code, reg = cli("regularize", wd, "--structure", "mlp", "--ratio", 0.25, "--steps", 200, "--lambda", 0.2,
                    "--lr", 1e-3, "--batch-size", 4, "--holdout", 4, "--eval-every", 5, "--until-converged")
    assert code == 0 and reg["stopped_early"] and reg["steps"] < 200 and reg["gap"] <= 0.01


def test_regularize_on_fresh_windows_of_a_dataset(calibrated, tiny_root):
    """``--dataset``: training (and the held-out gap) on that text's windows, every one of them, while the units
    are chosen on the calibration windows as without it -- the same plan, different weights; the record names the
    text and a plain run's record is unchanged."""
    import json
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    wd = calibrated("llama", samples=12, seqlen=32)
    plain = wd.parent / "plain"
    shutil.copytree(wd, plain)
    common = ["--structure", "mlp", "--ratio", 0.25, "--steps", 6, "--lr", 1e-3, "--holdout", 3, "--eval-every", 3]
    code, fresh = cli("regularize", wd, *common, "--dataset", tiny_root / "heldout.txt", "--seqlen", 16)
    assert code == 0
    tok = AutoTokenizer.from_pretrained(wd / "model")
    n_tokens = len(tok((tiny_root / "heldout.txt").read_text(encoding="utf-8"))["input_ids"])
    assert fresh["train_windows"] == n_tokens // 16 - 3 > 9  # more windows than the calibration's 9
    assert fresh["passes"] == pytest.approx(6 / fresh["train_windows"], abs=1e-3) and fresh["seqlen"] == 16
    code, base = cli("regularize", plain, *common, "--calibration-windows")
    assert code == 0 and base["train_windows"] == 9 and base["passes"] == pytest.approx(6 / 9, abs=1e-3)
    assert "seqlen" not in base
    assert fresh["plan"] == base["plan"]  # chosen on the calibration windows either way
    assert fresh["before"]["ppl"] != base["before"]["ppl"]  # measured on other held-out windows

    def weights(w):
        return {k: v for f in sorted((w / "model").glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = weights(wd), weights(plain)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    steps = {w: json.loads((w / "manifest.json").read_text())["steps"][-1]["params"] for w in (wd, plain)}
    assert steps[wd]["dataset"] == str(tiny_root / "heldout.txt") and steps[wd]["seqlen"] == 16
    assert not {"dataset", "text_field", "seqlen"} & steps[plain].keys()


def test_regularize_warns_past_one_pass_over_the_calibration_windows(calibrated, capsys):
    wd = calibrated("llama", samples=12, seqlen=32)
    code, reg = cli("regularize", wd, "--structure", "mlp", "--ratio", 0.25, "--steps", 10, "--lr", 1e-3,
                    "--holdout", 3, "--eval-every", 10, "--calibration-windows")
    assert code == 0 and reg["passes"] == pytest.approx(10 / 9, abs=1e-3)
    assert "10 steps are 1.1 passes over the 9 calibration windows" in capsys.readouterr().err


def test_regularize_trains_on_fresh_windows_of_the_calibration_text_by_default(calibrated, tiny_root, capsys):
    """With neither --dataset nor --calibration-windows, regularize reads the calibration text again and trains on
    its fresh windows: the same model, bit for bit, as naming that text with --dataset, and so recorded. When the
    text is gone, or no longer the text calibrate read, it trains on the calibration windows -- the model
    --calibration-windows gives -- and says why."""
    import json
    import shutil

    from safetensors.torch import load_file

    def weights(w):
        return {k: v for f in sorted((w / "model").glob("*.safetensors")) for k, v in load_file(f).items()}

    corpus = tiny_root / "corpus.txt"
    base = calibrated("llama", samples=12, seqlen=32)
    # A workdir calibrated on its own copy of the corpus, which this test may move and edit.
    own = base.parent / "own.txt"
    shutil.copy(corpus, own)
    work = {}
    for name in ("default", "named", "calibration", "gone", "edited"):
        work[name] = base.parent / name
        assert cli("calibrate", work[name], "--model", tiny_root / "llama", "--dataset", own, "--samples", 12,
                   "--seqlen", 32)[0] == 0
    common = ["--structure", "mlp", "--ratio", 0.25, "--steps", 4, "--lr", 1e-3, "--holdout", 3, "--eval-every", 4]
    code, default = cli("regularize", work["default"], *common)
    assert code == 0 and default["train_windows"] > 9  # more than the 12 - 3 calibration windows
    assert cli("regularize", work["named"], *common, "--dataset", own)[0] == 0
    assert cli("regularize", work["calibration"], *common, "--calibration-windows")[0] == 0
    a, b, c = (weights(work[n]) for n in ("default", "named", "calibration"))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)
    params = json.loads((work["default"] / "manifest.json").read_text())["steps"][-1]["params"]
    assert params["dataset"] == str(own)

    capsys.readouterr()
    own.rename(own.with_suffix(".moved"))  # the text is gone
    code, gone = cli("regularize", work["gone"], *common)
    assert code == 0 and gone["train_windows"] == 9
    err = " ".join(capsys.readouterr().err.split())  # as one line, whatever the terminal's width
    assert "training on the 9 calibration windows: the calibration text cannot be read again" in err
    own.with_suffix(".moved").write_text(corpus.read_text(encoding="utf-8") + " and a new last sentence.",
                                         encoding="utf-8")
    own.with_suffix(".moved").rename(own)  # back, but not the text calibrate read
    code, edited = cli("regularize", work["edited"], *common)
    assert code == 0 and edited["train_windows"] == 9
    assert "tokens now" in " ".join(capsys.readouterr().err.split())
    for name in ("gone", "edited"):
        w = weights(work[name])
        assert all(torch.equal(w[k], c[k]) for k in c), name
        assert "dataset" not in json.loads((work[name] / "manifest.json").read_text())["steps"][-1]["params"]


@pytest.mark.parametrize("extra", [[], ["--distill", "--teacher-steps", 2]], ids=["lm", "corrected-teacher"])
def test_an_interrupted_regularize_resumes_where_it_stopped(calibrated, tmp_path, monkeypatch, capsys, extra):
    """regularize checkpoints every --save-every steps: killed at the evaluation of step 8 (after the checkpoint of
    step 5), nothing is committed, and the rerun continues from step 5 -- with the teacher it corrected and kept, not
    a second correction -- to the weights an uninterrupted run gives; the commit leaves no checkpoint behind."""
    import json
    import shutil

    from safetensors.torch import load_file

    def weights(w):
        return {k: v for f in sorted((w / "model").glob("*.safetensors")) for k, v in load_file(f).items()}

    wd = calibrated("llama", samples=20, seqlen=64)
    ref = tmp_path / "ref"
    shutil.copytree(wd, ref)
    opts = ["--structure", "mlp", "--ratio", 0.25, "--steps", 12, "--eval-every", 8, "--save-every", 5,
            "--lr", 1e-3, "--holdout", 4, *extra]
    code, whole = cli("regularize", ref, *opts)
    assert code == 0 and whole["resumed_from"] is None

    manifest = (wd / "manifest.json").read_text()
    # The teacher's correction evaluates twice first; then two calls before training (with and without the units),
    # then step 8's evaluation.
    killed_at_evaluation(monkeypatch, ["regularize", wd, *opts], 3 + (2 if extra else 0))
    assert (wd / "manifest.json").read_text() == manifest  # nothing committed
    (state,) = (wd / ".resume").glob("regularize-*/state.json")
    assert json.loads(state.read_text())["step"] == 5
    assert (state.parent / "teacher" / "correction.json").is_file() == bool(extra)
    code, st = cli("status", wd)  # what the kill left, where, and how big
    (left,) = st["checkpoints"]
    assert code == 0 and left["command"] == "regularize" and left["step"] == 5 and left["teacher"] == bool(extra)
    assert left["path"] == str(state.parent) and left["bytes"] > state.with_name(json.loads(state.read_text())["tensors"]).stat().st_size
    capsys.readouterr()
    code, res = cli("regularize", wd, *opts)
    assert code == 0 and res["resumed_from"] == 5 and res["steps"] == 12
    assert "resuming from the checkpoint of step 5 of 12" in " ".join(capsys.readouterr().err.split())
    if extra:
        assert res["teacher_correction"]["reused"] and not whole["teacher_correction"].get("reused")
        assert res["teacher_correction"]["ppl_after"] == whole["teacher_correction"]["ppl_after"]
    a, b = weights(wd), weights(ref)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert res["ppl_zeroed"] == pytest.approx(whole["ppl_zeroed"], rel=1e-4)
    assert not list((wd / ".resume").glob("regularize-*"))  # cleaned up after the commit
    assert cli("status", wd)[1]["checkpoints"] == []


def test_a_regularize_without_checkpoints_still_clears_a_stale_one(calibrated, monkeypatch):
    """A run with --save-every 0 neither resumes nor writes a checkpoint, and once it commits the checkpoint an
    interrupted run left (keyed on the model it replaced) is gone."""
    wd = calibrated("llama", samples=20, seqlen=64)
    opts = ["--structure", "mlp", "--ratio", 0.25, "--steps", 6, "--eval-every", 6, "--lr", 1e-3, "--holdout", 4]
    # Two evaluations before training, the third at step 6 (after the checkpoint of step 4).
    killed_at_evaluation(monkeypatch, ["regularize", wd, *opts, "--save-every", 2], 3)
    assert len(list((wd / ".resume").glob("regularize-*/state.json"))) == 1
    code, res = cli("regularize", wd, *opts, "--save-every", 0)
    assert code == 0 and res["resumed_from"] is None and res["steps"] == 6
    assert not list((wd / ".resume").glob("regularize-*"))


@pytest.mark.parametrize("args,says", [(["--seqlen", 16, "--calibration-windows"], "--calibration-windows trains"),
                                       (["--dataset", "corpus.txt", "--calibration-windows"], "give one of them"),
                                       (["--dataset", "nope.txt"], "does not exist"),
                                       (["--dataset", "corpus.txt", "--seqlen", 1], ">= 2"),
                                       (["--text-field", "body"], "--dataset"),
                                       (["--dataset", "corpus.txt", "--seqlen", 100000], "context")])
def test_regularize_dataset_refusals_leave_the_workdir_alone(calibrated, tiny_root, capsys, args, says):
    wd = calibrated("llama", samples=12, seqlen=32)
    capsys.readouterr()  # the fixture's own calibration, when this test is the first to ask for it
    manifest = (wd / "manifest.json").read_text()
    args = [str(tiny_root / a) if a == "corpus.txt" else a for a in args]
    assert cli("regularize", wd, "--structure", "mlp", "--ratio", 0.25, "--steps", 1, *args)[0] == 1
    err = capsys.readouterr().err.strip()
    assert says in err and "Traceback" not in err and len(err.splitlines()) <= 2
    assert (wd / "manifest.json").read_text() == manifest


def test_loss_mode_trains_and_lowers_the_penalty(calibrated):
    wd = calibrated("mistral", samples=12, seqlen=32)
    code, reg = cli("regularize", wd, "--shrink", "loss", "--lambda", 5, "--steps", 10, "--lr", 1e-3,
                    "--batch-size", 4, "--holdout", 4, "--eval-every", 5)
    assert code == 0 and reg["relative_norm"] < 1.0
    assert reg["loss"][-1] < reg["loss"][0]  # the LM loss falls while the slices shrink


def test_eval_speed_compares_with_a_baseline_in_one_run(calibrated, tiny_root):
    wd = calibrated("llama", samples=4, seqlen=32)
    assert cli("prune", wd, "--method", "dress", "--structure", "layers", "--ratio", 0.5, "--select", "tail")[0] == 0
    code, ev = cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 32, "--max-windows", 2, "--speed",
                   "--speed-baseline", tiny_root / "llama", "--prompt-len", 32, "--new-tokens", 4)
    sp = ev["speed"]
    assert code == 0 and sp["prefill_tokens_per_s"] > 0 and sp["baseline_decode_tokens_per_s"] > 0
    lo, hi = sp["prefill_speedup_range"]  # the median of the paired ratios lies within them
    assert 0 < lo <= sp["prefill_speedup"] <= hi and sp["reps"] == 5
    assert math.isfinite(sp["decode_speedup"])


def test_eval_speed_at_several_batch_sizes_and_the_size_on_disk(calibrated, tiny_root):
    """``--speed-batches 1,3``: every figure at both batch sizes (batch 1's under the plain names, which the sweep and
    the benchmarks read), the speed-ups against the baseline at each; and the model's size on disk is its shards'."""
    wd = calibrated("llama", samples=4, seqlen=32)
    assert cli("prune", wd, "--method", "dress", "--structure", "mlp", "--ratio", 0.5)[0] == 0
    code, ev = cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 32, "--max-windows", 2, "--speed",
                   "--speed-baseline", tiny_root / "llama", "--prompt-len", 16, "--new-tokens", 3,
                   "--speed-batches", "1,3")
    assert code == 0, ev
    sp = ev["speed"]
    assert sp["batches"] == [1, 3]
    for sfx in ("", "_b3"):
        for phase in ("prefill", "decode"):
            assert sp[f"{phase}_tokens_per_s{sfx}"] > 0 and sp[f"baseline_{phase}_tokens_per_s{sfx}"] > 0
            # the median of the paired ratios, inside their range (not the ratio of the medians)
            lo, hi = sp[f"{phase}_speedup_range{sfx}"]
            assert 0 < lo <= sp[f"{phase}_speedup{sfx}"] <= hi
            assert sp[f"{phase}_speedup_verdict{sfx}"] in ("faster", "slower", "within noise")
    shards = sorted((wd / "model").glob("*.safetensors"))
    assert shards and ev["model_bytes"] == sum(f.stat().st_size for f in shards)
    dense = sum(f.stat().st_size for f in (tiny_root / "llama").glob("*.safetensors"))
    assert ev["model_bytes"] < dense  # half the MLP channels are gone from the file, not only zeroed


@pytest.mark.parametrize("structure,multiple", [("mlp", 32), ("hidden", 16)])
def test_width_multiple_keeps_an_aligned_width(calibrated, structure, multiple):
    """--width-multiple: the kept width is the multiple nearest the one --target-params asks for (hidden: also a
    multiple of the head count), recorded with the ratio it resolved to."""
    import json

    wd = calibrated("llama")
    code, res = cli("prune", wd, "--method", "dress", "--structure", structure, "--target-params", "0.8",
                    "--width-multiple", multiple)
    assert code == 0
    key = {"mlp": "intermediate_size", "hidden": "hidden_size"}[structure]
    width = json.loads((wd / "model" / "config.json").read_text())[key]
    before = {"mlp": 128, "hidden": 64}[structure]
    assert width % multiple == 0 and 0 < width < before
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["params"]["width_multiple"] == multiple
    assert step["params"]["ratio"] == pytest.approx((before - width) / before)


def test_width_multiple_in_regularize_and_its_refusals(calibrated, tiny_root):
    import json

    wd = calibrated("llama")
    code, _ = cli("regularize", wd, "--structure", "mlp", "--ratio", 0.2, "--width-multiple", 32, "--steps", 2,
                  "--holdout", 2, "--eval-every", 1)
    assert code == 0
    assert cli("prune", wd, "--method", "dress", "--width-multiple", 32)[0] == 1  # the plan is shaped already
    assert cli("prune", wd, "--method", "dress")[0] == 0
    assert json.loads((wd / "model" / "config.json").read_text())["intermediate_size"] == 96  # 128 * 0.8 -> 96
    other = calibrated("qwen3")
    assert cli("prune", other, "--method", "dress", "--structure", "layers", "--width-multiple", 32)[0] == 1
    assert cli("prune", other, "--method", "dress", "--structure", "mlp", "--ratio", 0.05,
               "--width-multiple", 256)[0] == 1  # the nearest multiple of 256 to 122 of 128 keeps everything

"""`recover` on tiny models: LoRA lowers the loss, the merge keeps every pruned zero, an interrupted run resumes,
and `accelerate launch` with two processes follows the single-process loss curve."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from llmprune import units
from conftest import cli, killed_at_evaluation
from llmprune.cli import run
from llmprune.masks import nm_valid

FAST = ["--lr", 2e-3, "--batch-size", 4, "--holdout", 4, "--dropout", 0.0]


def _weights(wd: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((wd / "model").glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("masked", [True, False])
def test_merge_keeps_every_pruned_zero(calibrated, masked):
    wd = calibrated("llama", samples=20, seqlen=64)
    assert cli("prune", wd, "--method", "wanda", "--pattern", "2:4")[0] == 0
    before = _weights(wd)
    code, res = cli("recover", wd, "--steps", 12, "--eval-every", 6, *FAST, "--masked" if masked else "--no-masked")
    assert code == 0
    after = _weights(wd)
    linears = [k for k in before if k.startswith("model.layers.") and k.endswith("proj.weight")]
    assert len(linears) == 14 and res["pruned_layers"] == 14
    for k in linears:
        assert torch.equal(after[k] == 0, before[k] == 0), k  # exactly the zeros it had
        assert nm_valid(after[k], 2, 4), k
        assert not torch.equal(after[k], before[k]), k  # and the kept weights did learn
    assert res["sparsity"]["all"] == pytest.approx(0.5)
    assert res["ppl_adapter"] < res["ppl_before"]  # LoRA steps lower the held-out loss
    if masked:
        # Trained through the mask: the re-masked merge is the trained model.
        assert res["ppl_remasked"] == pytest.approx(res["ppl_adapter"], rel=1e-3)
    else:
        assert res["weights_remasked"] > 0 and res["ppl_remasked"] != res["ppl_adapter"]
    # The adapter is kept in the workdir as safetensors + adapter_config.json.
    cfg = json.loads((wd / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and (wd / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("arch", tiny.ARCH_TYPES)
def test_lora_recovery_on_every_architecture(calibrated, tiny_root, arch):
    """LoRA adapts every prunable Linear of every block by default (fused projections included; the attention of
    MoE models), and the merge keeps each one's 2:4 zeros; what is not adapted keeps its pruned values exactly."""
    from transformers import AutoModelForCausalLM

    from llmprune import arch as _arch

    def prunable(folder):
        model = AutoModelForCausalLM.from_pretrained(folder)
        return {f"{i}.{n}": lin.weight.detach().clone() for i, b in enumerate(_arch.blocks(model))
                for n, lin in units.block_linears(b).items()}, model.config.model_type

    dense, model_type = prunable(tiny_root / arch)
    targets = set(_arch.arch_for(model_type).lora_targets)
    adapted = {n for n in dense if n.rsplit(".", 1)[-1] in targets}
    if arch in tiny.MOE_TYPES:  # MoE: every Linear of the attention (see arch._MOE_LORA), latent ones included
        attention = {n for n in dense if n.split(".")[1] in ("self_attn", "linear_attn")}
        assert adapted == attention and attention
    else:  # dense: every prunable Linear
        assert adapted == set(dense)
    wd = calibrated(arch, samples=12, seqlen=32)
    assert cli("prune", wd, "--method", "wanda", "--pattern", "2:4")[0] == 0
    before, _ = prunable(wd / "model")
    code, res = cli("recover", wd, "--steps", 4, "--eval-every", 4, *FAST)
    assert code == 0 and res["pruned_layers"] == len(before)
    after, _ = prunable(wd / "model")
    for k in before:
        assert torch.equal(after[k] == 0, before[k] == 0) and nm_valid(after[k], 2, 4), k
        assert torch.equal(after[k], before[k]) != (k in adapted), k


def test_no_merge_keeps_the_base_and_saves_the_adapter(calibrated):
    wd = calibrated("qwen3", samples=12, seqlen=32)
    before = _weights(wd)
    code, res = cli("recover", wd, "--steps", 4, "--no-merge", *FAST)
    assert code == 0 and "ppl_merged" not in res
    assert all(torch.equal(before[k], v) for k, v in _weights(wd).items())
    assert (wd / "adapter" / "adapter_model.safetensors").is_file()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_an_unmerged_adapter_is_part_of_the_model_and_exports_for_peft(calibrated, tiny_root, tmp_path):
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    wd = calibrated("llama", samples=16, seqlen=32)
    twin = tmp_path / "twin"
    shutil.copytree(wd, twin)
    opts = ["--steps", 6, *FAST]
    assert cli("recover", wd, "--no-merge", *opts)[0] == 0
    assert cli("recover", twin, "--merge", *opts)[0] == 0
    assert cli("status", wd)[1]["adapter"] == "unmerged" and cli("status", twin)[1]["adapter"] == "merged"
    ev = ["--dataset", tiny_root / "heldout.txt", "--seqlen", 32]
    # eval sees the adapter: the unmerged workdir measures what the merged one does.
    _, unmerged = cli("eval", wd, *ev)
    _, merged = cli("eval", twin, *ev)
    assert unmerged["perplexity"] == pytest.approx(merged["perplexity"], rel=1e-5)

    code, res = cli("export", wd, "--out", tmp_path / "peft", "--format", "peft", "--adapter-base", "me/pruned")
    assert code == 0 and {"adapter/adapter_model.safetensors", "model.safetensors"} <= {
        f["path"] for f in res["files"]}
    cfg = json.loads((tmp_path / "peft" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "me/pruned"
    assert 'subfolder="adapter"' in (tmp_path / "peft" / "README.md").read_text()
    assert cli("export", wd, "--out", tmp_path / "merged")[0] == 0  # merged: the adapter folded in
    ids = torch.randint(0, 100, (2, 16))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft")
    with_adapter = _logits(PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval(), ids)
    folded = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids)
    plain = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "peft"), ids)
    assert torch.allclose(with_adapter, folded, atol=1e-5) and not torch.allclose(plain, folded, atol=1e-3)

    # A second unmerged recovery trains on the model with the first adapter folded in, which becomes model/.
    code, res = cli("recover", wd, "--no-merge", *opts)
    assert code == 0
    assert all(torch.equal(v, load_file(tmp_path / "merged" / "model.safetensors")[k]) for k, v in _weights(wd).items())


def test_adapter_exports_and_their_refusals(calibrated, tmp_path):
    wd = calibrated("llama", samples=16, seqlen=32)
    assert cli("export", wd, "--out", tmp_path / "a", "--format", "adapter")[0] == 1  # no adapter yet
    assert cli("prune", wd, "--method", "wanda", "--pattern", "2:4")[0] == 0
    assert cli("recover", wd, "--no-merge", "--steps", 3, *FAST)[0] == 0
    # Trained through the 2:4 mask: plain peft would apply the update densely, so a peft export is refused ...
    assert cli("export", wd, "--out", tmp_path / "p", "--format", "peft")[0] == 1
    assert not (tmp_path / "p").exists()
    # ... while the merged export is the trained model, 2:4 to the last weight.
    assert cli("export", wd, "--out", tmp_path / "m")[0] == 0
    w = load_file(tmp_path / "m" / "model.safetensors")
    assert all(nm_valid(v, 2, 4) for k, v in w.items() if k.startswith("model.layers.") and k.endswith("proj.weight"))
    code, res = cli("export", wd, "--out", tmp_path / "a", "--format", "adapter")
    assert code == 0 and [f["path"] for f in res["files"]] == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "library_name: peft" in (tmp_path / "a" / "README.md").read_text()
    assert cli("recover", wd, "--steps", 3, *FAST)[0] == 0  # merged now
    assert cli("export", wd, "--out", tmp_path / "p", "--format", "peft")[0] == 1
    assert cli("export", wd, "--out", tmp_path / "p", "--format", "onnx")[0] == 1
    assert cli("export", wd, "--out", tmp_path / "g", "--format", "gguf")[0] == 0  # the recovered model, merged


def test_structured_models_merge_plainly(calibrated):
    wd = calibrated("mistral", samples=12, seqlen=32)
    assert cli("prune", wd, "--method", "dress", "--ratio", 0.25, "--select", "tail")[0] == 0
    code, res = cli("recover", wd, "--steps", 4, *FAST)
    assert code == 0 and res["pruned_layers"] == 0 and res["weights_remasked"] == 0


def test_interrupted_recovery_resumes_where_it_stopped(calibrated, tmp_path, monkeypatch, capsys):
    import shutil

    wd = calibrated("llama", samples=20, seqlen=64)
    assert cli("prune", wd, "--method", "wanda", "--sparsity", 0.5)[0] == 0
    ref = tmp_path / "ref"
    shutil.copytree(wd, ref)
    opts = ["--steps", 16, "--eval-every", 12, "--save-every", 5, *FAST]
    assert cli("recover", ref, *opts)[0] == 0  # uninterrupted

    manifest = (wd / "manifest.json").read_text()
    # The evaluation at step 12 is killed (after checkpoints at steps 5 and 10); the first is before training.
    killed_at_evaluation(monkeypatch, ["recover", wd, *opts], 2)
    assert (wd / "manifest.json").read_text() == manifest  # nothing committed
    assert list((wd / ".resume").glob("recover-*/state.json"))
    code, res = cli("recover", wd, *opts)
    assert code == 0 and res["resumed_from"] == 10 and res["steps"] == 16
    a, b = _weights(wd), _weights(ref)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert not list((wd / ".resume").glob("recover-*"))  # cleaned up after the commit


def _killed_at_the_last_evaluation(monkeypatch, wd, opts) -> None:
    """Run ``recover wd opts`` (8 steps, evaluated at step 8 only) and kill it at that evaluation -- after the
    checkpoint of step 6 -- as Ctrl-C would: exit 130, nothing committed. (The first call is the evaluation
    before training.)"""
    killed_at_evaluation(monkeypatch, ["recover", wd, *opts], 2)


def test_a_changed_training_text_never_resumes_the_old_run(calibrated, tmp_path, monkeypatch):
    """The checkpoint is keyed on the text's contents, not only its path: editing the ``--dataset`` file between an
    interrupted run and its rerun starts afresh (on the new text), and the commit leaves no checkpoint behind."""
    wd = calibrated("llama", samples=20, seqlen=64)
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"word{i % 97} and text number {i}." for i in range(3000)), encoding="utf-8")
    opts = ["--dataset", text, "--steps", 8, "--eval-every", 8, "--save-every", 3, *FAST]
    _killed_at_the_last_evaluation(monkeypatch, wd, opts)
    assert len(list((wd / ".resume").glob("recover-*/state.json"))) == 1
    text.write_text(text.read_text(encoding="utf-8").replace("word", "token"), encoding="utf-8")  # same path
    code, res = cli("recover", wd, *opts)
    assert code == 0 and res["resumed_from"] is None and res["steps"] == 8
    assert not list((wd / ".resume").glob("recover-*"))  # the stale checkpoint too


@pytest.mark.parametrize("damage", ["truncated json", "edited step", "step beyond the run", "edited tensors"])
def test_a_damaged_checkpoint_is_discarded_and_the_step_starts_afresh(calibrated, tmp_path, monkeypatch, capsys,
                                                                      damage):
    """Resume state is verified like everything else: a damaged checkpoint is never trusted (no decoder error on
    every rerun, no run that never ends); it is discarded with a warning and the step gives what a fresh run gives."""
    import shutil

    import llmprune.train as train_mod

    wd = calibrated("llama", samples=20, seqlen=64)
    ref = tmp_path / "ref"
    shutil.copytree(wd, ref)
    opts = ["--steps", 8, "--eval-every", 8, "--save-every", 3, *FAST]
    assert cli("recover", ref, *opts)[0] == 0
    _killed_at_the_last_evaluation(monkeypatch, wd, opts)
    (state,) = (wd / ".resume").glob("recover-*/state.json")
    text = state.read_text()
    if damage == "truncated json":
        state.write_text(text[: len(text) // 2])
    elif damage == "edited step":
        state.write_text(text.replace('"step": 6', '"step": 3'))
    elif damage == "step beyond the run":
        meta = json.loads(text)
        meta.pop("sha256")
        meta["step"] = 10**9
        state.write_text(json.dumps({**meta, "sha256": train_mod._state_digest(meta)}))
    else:
        tensors = state.with_name(json.loads(text)["tensors"])
        raw = bytearray(tensors.read_bytes())
        raw[-1] ^= 0xFF  # one flipped byte in the tensor data
        tensors.write_bytes(bytes(raw))
    capsys.readouterr()
    code, res = cli("recover", wd, *opts)
    assert code == 0 and res["resumed_from"] is None and res["steps"] == 8
    assert "discarding the checkpoint" in capsys.readouterr().err
    a, b = _weights(wd), _weights(ref)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one(calibrated, tmp_path, monkeypatch):
    """Killed after step 6's tensors are written and before its state.json names them, the run still has step 3's
    checkpoint whole (each checkpoint's tensors are a file of their own), resumes from it and ends at the weights
    an uninterrupted run gives."""
    import shutil

    import llmprune.fsio as fsio_mod

    wd = calibrated("llama", samples=20, seqlen=64)
    ref = tmp_path / "ref"
    shutil.copytree(wd, ref)
    opts = ["--steps", 8, "--eval-every", 8, "--save-every", 3, *FAST]
    assert cli("recover", ref, *opts)[0] == 0
    real = fsio_mod.atomic_write_text

    def dying(path, text, *a, **k):
        if Path(path).name == "state.json" and json.loads(text)["step"] == 6:
            raise KeyboardInterrupt
        return real(path, text, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(fsio_mod, "atomic_write_text", dying)
        assert run(["recover", str(wd), *map(str, opts)]) == 130
    (state,) = (wd / ".resume").glob("recover-*/state.json")
    assert json.loads(state.read_text())["step"] == 3
    assert len(list(state.parent.glob("state-*.safetensors"))) == 2  # step 3's, and step 6's that nothing names
    code, res = cli("recover", wd, *opts)
    assert code == 0 and res["resumed_from"] == 3 and res["steps"] == 8
    a, b = _weights(wd), _weights(ref)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--full", "--distill"], ["--full", "--distill", "--teacher-steps", 2]],
                         ids=["lora", "full-distill", "corrected-teacher"])
def test_two_processes_follow_the_single_process_loss_curve(calibrated, tmp_path, extra):
    """`accelerate launch --num_processes 2 --cpu` (gloo): each process takes half of every batch (and, distilling,
    holds its own teacher; correcting it, each process corrects its copy and only the main one keeps it beside the
    checkpoints)."""
    import shutil

    wd = calibrated("llama", samples=36, seqlen=64)
    assert cli("prune", wd, "--method", "wanda", "--sparsity", 0.5)[0] == 0
    two = tmp_path / "two"
    shutil.copytree(wd, two)
    lora = [] if "--full" in extra else ["--dropout", 0.0]  # --full refuses LoRA's options
    keep = 4 if "--teacher-steps" in extra else 0  # checkpoints (and the kept teacher) written by one process
    opts = ["--steps", 8, "--eval-every", 8, "--lr", 1e-3, "--holdout", 4, *lora, "--save-every", keep, *extra]
    code, one = cli("recover", wd, *opts, "--batch-size", 4)
    assert code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llmprune",
                        "recover", str(two), *map(str, opts), "--batch-size", "2", "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [s for s in json.loads((two / "manifest.json").read_text())["steps"] if s["command"] == "recover"]
    assert len(steps) == 1  # only the main process committed
    multi = steps[0]["metrics"]["loss"]
    assert len(multi) == len(one["loss"]) == 8
    # The same windows per step, split across two processes: the curves agree within noise.
    for a, b in zip(one["loss"], multi):
        assert abs(a - b) < 0.05 * a, (one["loss"], multi)
    if "--teacher-steps" in extra:
        assert one["teacher_correction"]["steps"] == steps[0]["metrics"]["teacher_correction"]["steps"] == 2
        assert not list((two / ".resume").glob("recover-*"))  # committed: nothing kept
    if extra:  # the KD curve too: the pruned student against its dense teacher
        kd = steps[0]["metrics"]["kd"]
        assert len(kd) == 8 and kd[0] > 0
        # A KD loss varies more from window to window than the LM loss (whose curves agree above), and the two runs
        # deal the windows to the processes differently: both curves fall, from the same order of magnitude.
        assert sum(kd[-4:]) / 4 < kd[0] and sum(one["kd"][-4:]) / 4 < one["kd"][0]
        assert 0.5 < kd[0] / one["kd"][0] < 2


def test_a_checkpoint_that_cannot_be_written_costs_the_checkpoint_not_the_run(calibrated, monkeypatch, capsys):
    """A full disk while checkpointing: the step warns and trains on to the end and commits, as a run without
    checkpoints would."""
    import llmprune.train as train_mod

    wd = calibrated("llama", samples=20, seqlen=64)
    assert cli("prune", wd, "--method", "wanda", "--sparsity", 0.5)[0] == 0

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_mod, "save_checkpoint", full)
    capsys.readouterr()
    code, res = cli("recover", wd, "--steps", 6, "--eval-every", 6, "--save-every", 2, *FAST)
    assert code == 0 and res["steps"] == 6
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("could not write the checkpoint of step") == 2 and "No space left on device" in err


def test_status_does_not_offer_a_checkpoint_of_the_earlier_layout(tmp_path):
    """A checkpoint whose state.json names no tensors file (written before they were per-step files) is discarded
    by the rerun, so ``status`` shows no step to resume from; one that names its file does."""
    from llmprune import resume

    old, new = tmp_path / ".resume" / "recover-aaaa", tmp_path / ".resume" / "recover-bbbb"
    old.mkdir(parents=True)
    new.mkdir()
    (old / "state.json").write_text(json.dumps({"step": 6}))
    (old / "state.safetensors").write_bytes(b"x")
    (new / "state.json").write_text(json.dumps({"step": 6, "tensors": "state-00000006.safetensors"}))
    (new / "state-00000006.safetensors").write_bytes(b"x")
    steps = {p["path"].rsplit("-", 1)[1]: p["step"] for p in resume.pending(tmp_path)}
    assert steps == {"aaaa": None, "bbbb": 6}


def test_the_zero_pattern_to_keep_is_read_from_the_record(calibrated):
    """A prune step records the zeros a later step must keep (``zero_pattern``); recover reads that record, and
    asks the method registry only for a step recorded before the field existed."""
    from llmprune.recovery import is_sparse

    wd = calibrated("llama")
    assert cli("prune", wd, "--method", "wanda", "--pattern", "2:4")[0] == 0
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["metrics"]["zero_pattern"] == "2:4"

    def manifest(method, metrics):
        return {"steps": [{"command": "prune", "params": {"method": method}, "metrics": metrics}]}

    assert is_sparse(manifest("wanda", {"zero_pattern": "2:4"}))
    assert not is_sparse(manifest("wanda", {"zero_pattern": None}))  # the record wins over the registry
    assert not is_sparse(manifest("dress", {}))  # an older record: the registry says dress leaves no zeros
    assert is_sparse(manifest("a-future-method", {}))  # unknown: keep its zeros


def test_one_training_runs_device_never_leaks_into_the_next(monkeypatch):
    """accelerate's shared state is set by the first Accelerator of a process; each training starts from a fresh one,
    so a CPU run before a --device cuda run (one test session, one recipe) does not keep the second on the CPU."""
    from accelerate.state import PartialState

    from llmprune import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train.accelerator("cpu").state.use_distributed is False and PartialState()._cpu is True
    train.accelerator("auto")
    assert PartialState()._cpu is False  # without the reset it stays True: the first run's setting


def test_bf16_precision_trains_under_autocast_and_keeps_fp32_state(calibrated, monkeypatch, tmp_path, capsys):
    """--precision bf16: the passes under bf16 autocast, the weights and AdamW's state in fp32; recorded as resolved
    (auto is fp32 on the CPU); close to the fp32 run, not equal to it."""
    from llmprune import train as train_mod

    seen = []
    real = train_mod._micro_step

    def spy(acc, wrapped, opt, *a, **k):
        seen.append((acc.mixed_precision, {p.dtype for p in wrapped.parameters()},
                     {s["exp_avg"].dtype for s in opt.state.values() if "exp_avg" in s}))
        return real(acc, wrapped, opt, *a, **k)

    monkeypatch.setattr(train_mod, "_micro_step", spy)
    res, base = {}, calibrated("llama", samples=20, seqlen=64)
    for precision in ("auto", "bf16"):
        wd = tmp_path / precision
        shutil.copytree(base, wd)
        code, res[precision] = cli("recover", wd, "--full", "--steps", 4, "--eval-every", 4, *FAST[:-2],
                                   "--precision", precision)
        assert code == 0
        step = [s for s in json.loads((wd / "manifest.json").read_text())["steps"] if s["command"] == "recover"][-1]
        assert step["params"]["precision"] == {"auto": "fp32", "bf16": "bf16"}[precision]
    assert {s[0] for s in seen[:4]} == {"no"} and {s[0] for s in seen[4:]} == {"bf16"}
    assert all(s[1] == {torch.float32} and s[2] <= {torch.float32} for s in seen)
    a, b = res["auto"]["ppl_after"], res["bf16"]["ppl_after"]
    assert a != b and b == pytest.approx(a, rel=0.05)
    capsys.readouterr()
    assert run(["recover", str(base), "--precision", "fp16"]) == 1
    assert "fp16 would need loss scaling" in capsys.readouterr().err


def test_the_cosine_schedule_warms_up_then_decays_to_zero():
    from llmprune.train import rate

    lrs = [rate(s, 50, 1e-3, "cosine") for s in range(1, 51)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])  # 10% of the steps: a linear warmup
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == 0.0  # then a monotone decay to zero
    assert rate(7, 50, 1e-3, "constant") == 1e-3


def test_recover_with_the_cosine_schedule_is_recorded_and_resumes_exactly(calibrated, monkeypatch):
    """The rate is a function of the step: a run killed after a checkpoint resumes on the same rates, to the
    weights of an uninterrupted run; ``schedule`` is recorded (a constant rate, as before the option, is not)."""
    wd = calibrated("llama", samples=20, seqlen=64)
    ref = wd.parent / "ref"
    shutil.copytree(wd, ref)
    opts = ["--steps", 8, "--eval-every", 4, "--save-every", 3, "--schedule", "cosine", *FAST]
    code, whole = cli("recover", ref, *opts)
    assert code == 0
    killed_at_evaluation(monkeypatch, ["recover", wd, *opts], 3)  # before training, step 4, then step 8
    code, res = cli("recover", wd, *opts)
    assert code == 0 and res["resumed_from"] == 6
    a, b = _weights(wd), _weights(ref)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    steps = json.loads((wd / "manifest.json").read_text())["steps"]
    assert steps[-1]["params"]["schedule"] == "cosine"
    assert cli("recover", wd, "--steps", 2, *FAST)[0] == 0
    assert "schedule" not in json.loads((wd / "manifest.json").read_text())["steps"][-1]["params"]


def test_recover_starts_after_the_windows_regularize_trained_on(calibrated, tiny_root, tmp_path, capsys):
    """Given the text and seed regularize trained on, recover's windows are the same ones in the same order: it
    starts after those regularize used (retraining on them made the model worse on held-out text). Another seed
    (another order) starts at the beginning; the two runs differ."""
    wd = calibrated("llama", samples=12, seqlen=32)
    text = ["--dataset", tiny_root / "heldout.txt", "--seqlen", 16]
    code, reg = cli("regularize", wd, "--structure", "mlp", "--ratio", 0.25, "--steps", 6, "--batch-size", 2,
                    "--holdout", 3, "--eval-every", 6, *text)
    assert code == 0 and reg["windows_seen"] == 12 and reg["train_windows"] > 12
    assert cli("prune", wd, "--method", "dress")[0] == 0
    other = tmp_path / "other"
    shutil.copytree(wd, other)
    capsys.readouterr()
    code, res = cli("recover", wd, "--full", "--steps", 3, "--holdout", 3, "--eval-every", 3, *text)
    assert code == 0 and res["windows_passed"] == 12
    assert "recover starts after the 12 of these" in " ".join(capsys.readouterr().err.split())
    code, res2 = cli("recover", other, "--full", "--steps", 3, "--holdout", 3, "--eval-every", 3, "--seed", 1, *text)
    assert code == 0 and res2["windows_passed"] == 0 and res2["loss"] != res["loss"]

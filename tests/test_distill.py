"""Distillation from the dense teacher (`recover --distill`, `regularize --distill`) and full fine-tuning
(`recover --full`): the loss against an independent computation, the teacher kept by `calibrate`, and the steps'
invariants on tiny models."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli
from llmprune.distill import kd_loss, lm_loss

FAST = ["--batch-size", 4, "--holdout", 4, "--dropout", 0.0]
FULL = ["--full", "--batch-size", 4, "--holdout", 4]  # --full refuses the LoRA options (--dropout among them)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- the loss --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_loss_is_t2_times_the_token_mean_kl(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 7, 11, generator=g), torch.randn(2, 7, 11, generator=g) * 3
    p = torch.softmax(t[:, :-1] / temperature, -1)
    q = torch.softmax(s[:, :-1] / temperature, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()  # over the 2 x 6 positions that predict a next token
    torch.testing.assert_close(kd_loss(s, t, temperature), kl * temperature**2)
    assert kd_loss(t, t, temperature).abs() < 1e-6  # a student equal to its teacher has nothing to learn


def test_kd_gradient_at_t1_is_the_probability_gap():
    """d KL(p_t || p_s) / d z_s = (p_s - p_t) / tokens: the classic form, checked through autograd."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 5, 9, generator=g, requires_grad=True), torch.randn(1, 5, 9, generator=g)
    kd_loss(s, t).backward()
    want = (torch.softmax(s.detach(), -1) - torch.softmax(t, -1)) / 4
    want[:, -1] = 0  # the last position predicts nothing
    torch.testing.assert_close(s.grad, want)


def test_lm_loss_is_the_models_own(tiny_root):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_root / "llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(lm_loss(out.logits, ids), out.loss)


# --- the teacher -----------------------------------------------------------------------------------------------
def test_calibrate_keeps_the_teacher_as_hard_links(calibrated, tiny_root, tmp_path):
    wd = calibrated("llama", samples=12, seqlen=32)
    manifest = json.loads((wd / "manifest.json").read_text())
    model = {k.split("/", 1)[1]: v for k, v in manifest["files"].items() if k.startswith("model/")}
    teacher = {k.split("/", 1)[1]: v for k, v in manifest["files"].items() if k.startswith("teacher/")}
    assert model and teacher == model  # recorded, with the same hashes
    fresh = tmp_path / "fresh"  # the fixture copies; a fresh calibration shows the links themselves
    assert cli("calibrate", fresh, "--model", tiny_root / "llama", "--dataset", tiny_root / "corpus.txt",
               "--samples", 12, "--seqlen", 32)[0] == 0
    for name in model:
        assert os.stat(fresh / "model" / name).st_ino == os.stat(fresh / "teacher" / name).st_ino
    # status counts a hard-linked file once: the teacher costs nothing until the model is replaced
    once = sum(p.stat().st_size for d in ("model", "calib") for p in (fresh / d).rglob("*") if p.is_file())
    code, st = cli("status", fresh)
    assert code == 0 and st["teacher"] is True and st["bytes"] == once
    assert cli("prune", fresh, "--method", "magnitude", "--sparsity", 0.5)[0] == 0
    assert cli("status", fresh)[1]["bytes"] > once
    none = tmp_path / "none"
    assert cli("calibrate", none, "--model", tiny_root / "llama", "--dataset", tiny_root / "corpus.txt",
               "--samples", 12, "--seqlen", 32, "--no-keep-teacher")[0] == 0
    assert not (none / "teacher").exists()
    assert not any(k.startswith("teacher/") for k in json.loads((none / "manifest.json").read_text())["files"])


def test_distilling_an_unpruned_model_starts_at_zero_kd(calibrated):
    """LoRA's B starts at zero, so the student is the teacher at step 1: its KD loss is zero there."""
    wd = calibrated("qwen3", samples=12, seqlen=32)
    code, res = cli("recover", wd, "--distill", "--steps", 2, "--eval-every", 2, "--lr", 1e-3, *FAST)
    assert code == 0 and res["objective"] == "distill" and len(res["kd"]) == 2
    assert res["kd"][0] < 1e-6
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["params"]["distill"] and step["params"]["kd_temperature"] == 1.0
    assert any(k.startswith("teacher/") for k in step["inputs"])  # the teacher's hashes were checked and recorded


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_distillation_recovers_a_structured_model_toward_its_teacher(calibrated, arch):
    wd = calibrated(arch, samples=20, seqlen=32)
    teacher = _weights(wd / "teacher")
    assert cli("prune", wd, "--method", "dress", "--structure", "mlp", "--ratio", 0.5, "--select", "tail")[0] == 0
    code, res = cli("recover", wd, "--distill", "--kd-temperature", 2.0, "--steps", 8, "--eval-every", 8,
                    "--lr", 3e-3, *FAST)
    assert code == 0
    assert sum(res["kd"][-3:]) < sum(res["kd"][:3])  # the student moves toward the teacher
    assert res["teacher_parameters"] > res["parameters"]  # the teacher is the unpruned model
    after = _weights(wd / "teacher")
    assert teacher.keys() == after.keys() and all(torch.equal(teacher[k], after[k]) for k in teacher)


def test_kd_weight_mixes_in_the_lm_loss(calibrated):
    """At --kd-weight 0.5 the objective differs from pure KD, so the trained weights do too."""
    out = {}
    for w in (1.0, 0.5):
        wd = calibrated("llama", samples=12, seqlen=32)
        assert cli("prune", wd, "--method", "dress", "--structure", "mlp", "--ratio", 0.5, "--select", "tail")[0] == 0
        code, res = cli("recover", wd, "--distill", "--kd-weight", w, "--steps", 3, "--eval-every", 3, "--lr", 3e-3,
                        *FAST)
        assert code == 0
        out[w] = (res["kd"][0], _weights(wd / "model"))
        (wd.parent / f"done-{w}").mkdir()
        wd.rename(wd.parent / f"done-{w}" / "wd")
    assert out[1.0][0] == pytest.approx(out[0.5][0])  # step 1: same student, same teacher, same KD
    assert any(not torch.equal(out[1.0][1][k], out[0.5][1][k]) for k in out[1.0][1])


def test_the_objective_mixes_kd_and_lm_by_the_weight(tiny_root):
    """``Distiller.objective``: the KD term at the given temperature against the teacher's own logits, and the
    total ``w * KD + (1 - w) * LM``."""
    import tiny
    from llmprune.distill import Distiller

    teacher, _, _ = tiny.model_and_inputs(tiny_root, "llama", 1, 16, batch_size=1)
    torch.manual_seed(0)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
    student = torch.randn(2, 16, teacher.config.vocab_size)
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
    for temp, w in ((1.0, 1.0), (2.0, 0.3)):
        total, lm, kd = Distiller(teacher, temp, w).objective(ids, student)
        torch.testing.assert_close(kd, kd_loss(student, t, temp))
        torch.testing.assert_close(lm, lm_loss(student, ids))
        torch.testing.assert_close(total, w * kd + (1 - w) * lm)


def test_kd_temperature_reaches_the_loss_from_the_cli(calibrated):
    """The first step's KD loss (same student, teacher and windows) differs between T = 1 and T = 2: the option is
    not dropped on its way to the loss."""
    first = {}
    for temp in (1.0, 2.0):
        wd = calibrated("llama", samples=12, seqlen=32)
        assert cli("prune", wd, "--method", "dress", "--structure", "mlp", "--ratio", 0.5, "--select", "tail")[0] == 0
        code, res = cli("recover", wd, "--distill", "--kd-temperature", temp, "--steps", 1, "--eval-every", 1, *FAST)
        assert code == 0
        first[temp] = res["kd"][0]
        wd.rename(wd.parent / f"done-{temp}")
    assert first[1.0] > 0 and first[2.0] > 0 and abs(first[1.0] - first[2.0]) > 1e-4 * first[1.0]


def test_a_given_teacher_serves_a_workdir_that_keeps_none(tiny_root, tmp_path):
    wd = tmp_path / "wd"
    assert cli("calibrate", wd, "--model", tiny_root / "llama", "--dataset", tiny_root / "corpus.txt",
               "--samples", 12, "--seqlen", 32, "--no-keep-teacher")[0] == 0
    assert cli("recover", wd, "--distill", "--steps", 1, *FAST)[0] == 1  # nothing to distil from: refused
    code, res = cli("recover", wd, "--distill", "--teacher", tiny_root / "llama", "--steps", 2, "--eval-every", 2,
                    *FAST)
    assert code == 0 and res["kd"][0] < 1e-6  # the given teacher is the calibrated model


def test_a_teacher_with_another_vocabulary_is_refused(calibrated, tiny_root, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny_root / "llama")
    other.resize_token_embeddings(other.config.vocab_size + 8)
    other.save_pretrained(tmp_path / "other")
    for f in (tiny_root / "llama").glob("tok*"):
        (tmp_path / "other" / f.name).write_bytes(f.read_bytes())
    wd = calibrated("llama", samples=12, seqlen=32)
    manifest = (wd / "manifest.json").read_text()
    assert cli("recover", wd, "--distill", "--teacher", tmp_path / "other", "--steps", 1, *FAST)[0] == 1
    assert "vocabulary" in capsys.readouterr().err
    assert (wd / "manifest.json").read_text() == manifest


@pytest.mark.parametrize("args,says", [
    (["--teacher", "x"], "add --distill"), (["--kd-temperature", 2], "add --distill"),
    (["--kd-weight", 0.5], "add --distill"), (["--distill", "--kd-weight", 0], "--kd-weight"),
    (["--distill", "--kd-weight", 1.5], "--kd-weight"), (["--distill", "--kd-temperature", 0], "--kd-temperature"),
    (["--full", "--no-merge"], "--no-merge"), (["--full", "--targets", "q_proj"], "--targets"),
    (["--full", "--rank", 4], "--lora-rank"), (["--full", "--dropout", 0.0], "--lora-dropout"),
    (["--full", "--no-masked"], "--masked"), (["--teacher-steps", 2], "add --distill"),
    (["--distill", "--teacher-steps", -1], "--teacher-steps")])
def test_bad_distillation_options_are_one_line(calibrated, capsys, args, says):
    """Options that would be silently ignored (KD settings without --distill, LoRA settings with --full) are
    refused, as are out-of-range ones: one line naming the option, the workdir untouched."""
    wd = calibrated("llama", samples=12, seqlen=32)
    manifest = (wd / "manifest.json").read_text()
    assert cli("recover", wd, "--steps", 1, *args)[0] == 1
    err = capsys.readouterr().err.strip()
    assert err and "Traceback" not in err and says in err and len(err.splitlines()) <= 2
    assert (wd / "manifest.json").read_text() == manifest


@pytest.mark.parametrize("args", [["--kd-temperature", 2], ["--kd-weight", 0.5], ["--teacher", "x"]])
def test_regularize_refuses_kd_settings_without_distill(calibrated, capsys, args):
    wd = calibrated("llama", samples=12, seqlen=32)
    assert cli("regularize", wd, "--structure", "mlp", "--ratio", 0.25, "--steps", 1, *args)[0] == 1
    assert "add --distill" in capsys.readouterr().err


# --- teacher correction ----------------------------------------------------------------------------------------
def _structured_pair(calibrated, tmp_path):
    """A calibrated llama workdir with 25% of its MLP channels removed, and an unpruned copy of it."""
    import shutil

    wd = calibrated("llama", samples=20, seqlen=32)
    dense = tmp_path / "dense"
    shutil.copytree(wd, dense)
    assert cli("prune", wd, "--method", "dress", "--structure", "mlp", "--ratio", 0.25, "--select", "tail")[0] == 0
    return wd, dense


def _corrected_is_the_manual_recipe(monkeypatch, command, fitted, wd, manual, plain):
    """Run ``command --teacher-steps 3`` on ``wd``: its correction is ``fitted``'s (``recover --full --steps 3`` of
    the dense copy), its model the ``manual`` two-step one bit for bit, and not the ``plain`` (uncorrected) one.
    --teacher-steps uses the lr of `recover --full` (2e-5); the manual copy used 1e-3 so that three steps visibly
    move the tiny teacher: the correction's rate is patched to match for this comparison."""
    import llmprune.distill as distill_mod

    with monkeypatch.context() as m:
        m.setattr(distill_mod, "TEACHER_LR", 1e-3)
        code, res = cli(*command, "--teacher-steps", 3)
    assert code == 0
    c = res["teacher_correction"]
    assert c["steps"] == 3 and c["ppl_after"] == fitted["ppl_after"] and c["ppl_before"] == fitted["ppl_before"]
    a, b, p = _weights(wd / "model"), _weights(manual / "model"), _weights(plain / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], p[k]) for k in a)  # the correction changed what the student learned


def test_teacher_correction_equals_distilling_from_a_fully_fine_tuned_copy(calibrated, tmp_path, monkeypatch):
    """`--teacher-steps N` is the two-step recipe in one: `recover --full --steps N` on the dense model, then
    `--distill --teacher` that model. Same windows, same seed: the same student, bit for bit -- and not the student
    an uncorrected teacher gives."""
    import shutil

    wd, dense = _structured_pair(calibrated, tmp_path)
    plain, manual = tmp_path / "plain", tmp_path / "manual"
    shutil.copytree(wd, plain)
    shutil.copytree(wd, manual)
    code, fitted = cli("recover", dense, "--steps", 3, "--eval-every", 3, "--lr", 1e-3, *FULL)
    assert code == 0
    student = ["--distill", "--steps", 3, "--eval-every", 3, "--lr", 2e-3, *FAST]
    assert cli("recover", manual, *student, "--teacher", dense / "model")[0] == 0
    assert cli("recover", plain, *student)[0] == 0
    _corrected_is_the_manual_recipe(monkeypatch, ["recover", wd, *student], fitted, wd, manual, plain)
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["params"]["teacher_steps"] == 3
    assert "teacher_steps" not in json.loads((plain / "manifest.json").read_text())["steps"][-1]["params"]


@pytest.mark.parametrize("damaged", [False, True], ids=["kept", "damaged"])
def test_an_interrupted_run_keeps_its_corrected_teacher(calibrated, tmp_path, monkeypatch, capsys, damaged):
    """Killed after the correction and a student checkpoint, the rerun takes the corrected teacher it kept (no second
    correction) and ends where an uninterrupted run ends; nothing of it is left after the commit."""
    import shutil

    import llmprune.distill as distill_mod
    import llmprune.train as train_mod
    from llmprune.cli import run

    wd, _ = _structured_pair(calibrated, tmp_path)
    ref = tmp_path / "ref"
    shutil.copytree(wd, ref)
    opts = ["--distill", "--teacher-steps", 2, "--steps", 4, "--eval-every", 4, "--save-every", 2, "--lr", 2e-3, *FAST]
    assert cli("recover", ref, *opts)[0] == 0  # uninterrupted
    real = train_mod.save_checkpoint

    def dying(*a, **k):  # the student's first checkpoint is written, then the run is killed
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", dying)
    manifest = (wd / "manifest.json").read_text()
    assert run(["recover", str(wd), *map(str, opts)]) == 130
    assert (wd / "manifest.json").read_text() == manifest
    assert list((wd / ".resume").glob("recover-*/teacher/correction.json"))
    monkeypatch.undo()
    if damaged:  # a truncated shard: discarded with a warning and corrected again, to the same teacher
        shard = next((wd / ".resume").glob("recover-*/teacher/*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        def again(*a, **k):
            raise AssertionError("the teacher was corrected a second time")

        monkeypatch.setattr(distill_mod, "correct_teacher", again)
    capsys.readouterr()
    code, res = cli("recover", wd, *opts)
    assert code == 0 and res["resumed_from"] == 2
    assert res["teacher_correction"].get("reused", False) is not damaged
    assert ("discarding the kept corrected teacher" in capsys.readouterr().err) is damaged
    a, b = _weights(wd / "model"), _weights(ref / "model")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list((wd / ".resume").glob("recover-*"))


# --- full fine-tuning ------------------------------------------------------------------------------------------
def test_full_fine_tuning_keeps_a_sparse_pattern_exactly(calibrated):
    wd = calibrated("llama", samples=20, seqlen=32)
    assert cli("prune", wd, "--method", "wanda", "--sparsity", 0.5)[0] == 0
    before = _weights(wd / "model")
    code, res = cli("recover", wd, "--distill", "--steps", 4, "--eval-every", 4, "--lr", 1e-3, *FULL)
    assert code == 0 and res["mode"] == "full" and not (wd / "adapter").exists()
    after = _weights(wd / "model")
    pruned = [k for k in before if k.startswith("model.layers.") and k.endswith("proj.weight")]
    for k in pruned:
        assert torch.equal(after[k] == 0, before[k] == 0), k  # every zero kept, none added
        assert not torch.equal(after[k], before[k]), k
    assert res["trainable_parameters"] == sum(v.numel() for k, v in before.items() if k != "lm_head.weight")
    assert res["sparsity"]["all"] == pytest.approx(0.5)


def test_full_fine_tuning_of_a_structured_model(calibrated):
    wd = calibrated("qwen2", samples=20, seqlen=32)
    assert cli("prune", wd, "--method", "dress", "--structure", "mlp", "--ratio", 0.25, "--select", "tail")[0] == 0
    code, res = cli("recover", wd, "--steps", 6, "--eval-every", 6, "--lr", 2e-3, *FULL)
    assert code == 0 and res["objective"] == "lm" and res["ppl_after"] < res["ppl_before"]
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["params"]["lr"] == 2e-3 and step["params"]["full"] and "kd_weight" not in step["params"]


def test_regularize_distils_from_the_teacher(calibrated):
    wd = calibrated("llama", samples=20, seqlen=32)
    code, res = cli("regularize", wd, "--structure", "mlp", "--ratio", 0.25, "--select", "tail", "--steps", 4,
                    "--eval-every", 4, "--batch-size", 4, "--holdout", 4, "--distill")
    assert code == 0 and len(res["kd"]) == 4 and res["kd"][0] < 1e-6  # the model is its teacher at step 1
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["params"]["distill"] is True
    assert cli("prune", wd, "--method", "dress")[0] == 0


def test_regularize_with_teacher_correction_equals_the_two_step_recipe(calibrated, tmp_path, monkeypatch):
    """`regularize --distill --teacher-steps N` is `recover --full --steps N` on a dense copy, then `regularize
    --distill --teacher` that copy: the same regularised model, bit for bit, and not the one the uncorrected teacher
    gives; the correction is recorded and only when asked."""
    import shutil

    wd = calibrated("llama", samples=20, seqlen=32)
    dense, manual, plain = tmp_path / "dense", tmp_path / "manual", tmp_path / "plain"
    for w in (dense, manual, plain):
        shutil.copytree(wd, w)
    code, fitted = cli("recover", dense, "--steps", 3, "--eval-every", 3, "--lr", 1e-3, *FULL)
    assert code == 0
    reg = ["regularize", "--structure", "mlp", "--ratio", 0.25, "--select", "tail", "--steps", 3, "--eval-every", 3,
           "--batch-size", 4, "--holdout", 4, "--lr", 2e-3, "--distill", "--calibration-windows"]
    assert cli(reg[0], manual, *reg[1:], "--teacher", dense / "model")[0] == 0
    assert cli(reg[0], plain, *reg[1:])[0] == 0
    _corrected_is_the_manual_recipe(monkeypatch, [reg[0], wd, *reg[1:]], fitted, wd, manual, plain)
    params = [json.loads((w / "manifest.json").read_text())["steps"][-1]["params"] for w in (wd, plain)]
    assert params[0]["teacher_steps"] == 3 and "teacher_steps" not in params[1]
    assert cli("regularize", plain, "--steps", 1, "--teacher-steps", 2)[0] == 1  # without --distill: refused

"""The training engine in one process: resume, gradient accumulation, checkpoints, keep-best,
early stopping, gradient checkpointing, bf16, schedules, the data order, TensorBoard, task
inference and sentence pairs.

Runs use a tiny random BERT with MiniLM's tokenizer (as in test_cli), 18 training examples and
batch size 4 (5 micro-batches an epoch), a few steps each.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit import ConfigError, DataError
from peftkit.train import checkpoint
from peftkit.train.classify import ClassifyTask

from cli_helpers import assert_clean_error, bert_config, invoke, save_tiny_bert, write_topic_files

@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is faster on a shared machine (conftest.one_thread)."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def tiny_model(workdir) -> str:
    """A tiny BERT with BERT's usual dropout (0.1): training draws random numbers."""
    return save_tiny_bert(workdir / "tiny-bert", dropout=0.1)


@pytest.fixture(scope="module")
def still_model(workdir) -> str:
    """The same without dropout: for runs that must agree step for step."""
    return save_tiny_bert(workdir / "tiny-bert-still", dropout=0.0)


@pytest.fixture(scope="module")
def data_files(workdir) -> tuple[str, str]:
    return write_topic_files(workdir)  # 18 training examples: 5 micro-batches of 4 an epoch (4 + 4 + 4 + 4 + 2)


@pytest.fixture(scope="module")
def train(tiny_model, data_files):
    """``train(out, *flags)``: ``peftkit train`` on the tiny BERT and the 18/6 example files."""
    def run(out: Path, *flags, model: str = tiny_model, expect_ok: bool = True):
        args = ["train", "--quiet", "--model", model, "--data", data_files[0], "--eval-data", data_files[1],
                "--batch-size", 4, "--out", out, *flags]
        result = invoke(*args)
        if expect_ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def evals(out: Path) -> dict[int, dict]:
    return {r["step"]: r["eval"] for r in records(out) if "eval" in r}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-6) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=atol, rtol=0), (k, (ta[k] - tb[k]).abs().max().item())


def crash_copy(src: Path, dst: Path, keep_until: int) -> Path:
    """A copy of run ``src`` as if it had died right after its checkpoint at step ``keep_until``:
    later checkpoints and the final files gone, metrics.jsonl left as it was (the resumed run
    must drop what was logged after the checkpoint)."""
    shutil.copytree(src, dst)
    for ckpt in (dst / checkpoint.DIR).iterdir():
        if int(ckpt.name.split("-")[1]) > keep_until:
            shutil.rmtree(ckpt)
    shutil.rmtree(dst / "adapter")
    for name in ("summary.json", "loss.png"):
        (dst / name).unlink()
    assert checkpoint.latest(dst) == dst / checkpoint.DIR / f"step-{keep_until}"
    return dst


def assert_each_record_once(out: Path, steps: int, eval_steps: list[int]) -> None:
    rows = records(out)
    assert sorted(r["step"] for r in rows if "loss" in r) == list(range(1, steps + 1))
    assert sorted(r["step"] for r in rows if "eval" in r) == eval_steps


# -- resume ---------------------------------------------------------------------------------

RUN = ("--max-steps", 9, "--save-steps", 3, "--eval-steps", 3)  # default LoRA dropout 0.05


@pytest.fixture(scope="module")
def baseline(workdir, train) -> Path:
    """An uninterrupted run with a checkpoint every 3 steps."""
    out = workdir / "baseline"
    train(out, *RUN)
    assert sorted(p.name for p in (out / checkpoint.DIR).iterdir()) == ["step-3", "step-6", "step-9"]
    return out


def test_training_runs_in_train_mode_and_evaluates_in_eval_mode(workdir, train, monkeypatch):
    """Dropout (BERT's and LoRA's) is active in the training forward passes and off in evaluation."""
    seen = {"train": [], "eval": []}
    loss_sum, eval_sums = ClassifyTask.loss_sum, ClassifyTask.eval_sums

    def modes(model):
        return model.training, frozenset(m.training for m in model.modules() if isinstance(m, nn.Dropout))

    def spy_loss(self, model, batch):
        seen["train"].append(modes(model))
        return loss_sum(self, model, batch)

    def spy_eval(self, model, batch, keep):
        seen["eval"].append(modes(model))
        return eval_sums(self, model, batch, keep)

    monkeypatch.setattr(ClassifyTask, "loss_sum", spy_loss)
    monkeypatch.setattr(ClassifyTask, "eval_sums", spy_eval)
    train(workdir / "modes", "--max-steps", 3, "--eval-steps", 2)
    assert seen["train"] == [(True, frozenset({True}))] * 3
    assert seen["eval"] and all(m == (False, frozenset({False})) for m in seen["eval"])


@pytest.mark.parametrize("name, flags, resume_from, eval_steps", [
    # mid-epoch (step 3: 3 of 5 micro-batches), evaluating every 3 steps
    ("mid-epoch", RUN, 3, [0, 3, 6, 9]),
    # step 5 ends the first epoch exactly; evaluation after every epoch and at the end
    ("epoch-end", ("--max-steps", 9, "--save-steps", 5), 5, [0, 5, 9]),
    # windows of 2 micro-batches, the last of an epoch a single one (3 steps an epoch); step 2
    # leaves the epoch's short window for after the resume
    ("grad-accum", ("--max-steps", 7, "--grad-accum", 2, "--save-steps", 2), 2, [0, 3, 6, 7]),
    # the last step's checkpoint: the run died before writing adapter/
    ("run-end", ("--max-steps", 9, "--save-steps", 9), 9, [0, 5, 9]),
])
def test_resume_reaches_the_uninterrupted_run(workdir, train, baseline, name, flags, resume_from, eval_steps):
    whole = baseline if flags == RUN else workdir / f"whole-{name}"
    if whole != baseline:
        train(whole, *flags)
    assert_each_record_once(whole, summary(whole)["steps"], eval_steps)
    resumed = crash_copy(whole, workdir / f"resumed-{name}", resume_from)

    result = invoke("train", "--resume", resumed, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"resuming from step-{resume_from}" in result.output

    assert_same_adapter(resumed / "adapter", whole / "adapter")
    assert_each_record_once(resumed, summary(whole)["steps"], eval_steps)
    assert records(resumed) == records(whole)
    got, want = summary(resumed), summary(whole)
    assert (got["eval"], got["adapter_step"], got["steps"], got["epochs"]) == \
           (want["eval"], want["adapter_step"], want["steps"], want["epochs"])
    # the checkpoints the resumed run wrote again are those of the uninterrupted run
    for ckpt in (whole / checkpoint.DIR).iterdir():
        again = resumed / checkpoint.DIR / ckpt.name
        assert json.loads((again / checkpoint.STATE_FILE).read_text())["step"] == int(ckpt.name.split("-")[1])
        assert_same_adapter(again / checkpoint.ADAPTER_DIR, ckpt / checkpoint.ADAPTER_DIR)


def test_resume_restores_the_random_number_generators(workdir, baseline, monkeypatch):
    """Without the saved RNG states, dropout draws other masks and the run ends elsewhere:
    the resume test above depends on restoring them."""
    resumed = crash_copy(baseline, workdir / "resumed-without-rng", 3)
    monkeypatch.setattr(checkpoint, "set_rng_state", lambda state: torch.manual_seed(12345))
    result = invoke("train", "--resume", resumed, "--quiet")
    assert result.exit_code == 0, result.output
    assert max_difference(tensors(resumed / "adapter"), tensors(baseline / "adapter")) > 1e-5
    assert losses(resumed)[4] != losses(baseline)[4]
    assert losses(resumed)[3] == losses(baseline)[3]


def test_schedule_in_the_metrics(baseline):
    """Linear schedule, 9 steps, no warmup (int(0.1 * 9) = 0): the rate of step s is 2e-3 * (10 - s) / 9."""
    rows = [r for r in records(baseline) if "lr" in r]
    assert [r["lr"] for r in rows] == pytest.approx([2e-3 * (10 - s) / 9 for s in range(1, 10)])


# -- gradient accumulation ----------------------------------------------------------------


def test_gradient_accumulation_takes_the_steps_of_one_large_batch(workdir, train, still_model):
    """8 a batch, 4 x 2 accumulated and 2 x 4 accumulated take the same steps (without dropout);
    6 steps: two epochs, each ending with a short window of the 2 remaining examples."""
    common = ("--max-steps", 6, "--dropout", 0, "--eval-steps", 3)
    runs = {}
    for batch, accum in [(8, 1), (4, 2), (2, 4)]:
        out = workdir / f"accum-{batch}x{accum}"
        train(out, *common, "--batch-size", batch, "--grad-accum", accum, model=still_model)
        assert summary(out)["global_batch"] == 8 and summary(out)["steps"] == 6
        runs[batch, accum] = out
    big = runs[8, 1]
    big_losses = losses(big)
    assert sorted(big_losses) == list(range(1, 7))
    for key in [(4, 2), (2, 4)]:
        assert_same_adapter(runs[key] / "adapter", big / "adapter", atol=1e-5)
        assert losses(runs[key]) == pytest.approx(big_losses, abs=1e-5)
        assert summary(runs[key])["eval"]["loss"] == pytest.approx(summary(big)["eval"]["loss"], abs=1e-5)
    # the comparison can fail: batches of 4 without accumulation take other (twice as many) steps
    small = workdir / "accum-4x1"
    train(small, *common, "--batch-size", 4, model=still_model)
    assert max_difference(tensors(small / "adapter"), tensors(big / "adapter")) > 1e-4


# -- checkpoints ----------------------------------------------------------------------------


def test_a_failed_checkpoint_leaves_the_previous_one_whole(workdir, train, baseline, monkeypatch):
    out = workdir / "atomic"
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if "step-6" in str(f):
            real_save(obj, f, *args, **kwargs)  # a part of the file is there when the disk fills
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    result = train(out, *RUN, expect_ok=False)
    monkeypatch.undo()
    assert_clean_error(result, "No space left on device")

    root = out / checkpoint.DIR
    assert [p.name for p in root.iterdir()] == ["step-3"]  # no step-6, no temporary directory left
    assert not (out / "adapter").exists()
    state, trainer = checkpoint.read_state(root / "step-3")
    assert state["step"] == 3 and set(trainer) == {"model", "optimizer", "scheduler", "rng"}
    assert_same_adapter(root / "step-3" / checkpoint.ADAPTER_DIR,
                        baseline / checkpoint.DIR / "step-3" / checkpoint.ADAPTER_DIR)

    # a process killed in the middle of writing leaves a hidden temporary directory behind,
    # even one that looks complete: it is not a checkpoint
    leftover = root / ".step-6-k2j4x_"
    shutil.copytree(root / "step-3", leftover)
    state["step"] = 6
    (leftover / checkpoint.STATE_FILE).write_text(json.dumps(state))
    (root / "step-7").mkdir()  # and an incomplete directory with a checkpoint's name
    assert checkpoint.latest(out) == root / "step-3"

    result = invoke("train", "--resume", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "resuming from step-3" in result.output
    assert_same_adapter(out / "adapter", baseline / "adapter")
    assert records(out) == records(baseline)


def test_checkpoint_write_dir_replaces_a_directory_only_when_complete(tmp_path):
    final = tmp_path / "best"
    checkpoint.write_dir(final, lambda tmp: (tmp / "a.txt").write_text("one"))

    def broken(tmp: Path) -> None:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        checkpoint.write_dir(final, broken)
    assert (final / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    checkpoint.write_dir(final, lambda tmp: (tmp / "b.txt").write_text("three"))
    assert [p.name for p in final.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


# -- --resume errors ------------------------------------------------------------------------


def test_resume_errors(tmp_path, baseline):
    result = invoke("train", "--resume", tmp_path)
    assert_clean_error(result, "--resume", "options.json", "not a peftkit run directory")

    no_checkpoints = tmp_path / "no-checkpoints"
    no_checkpoints.mkdir()
    shutil.copy(baseline / "options.json", no_checkpoints / "options.json")
    result = invoke("train", "--resume", no_checkpoints)
    assert_clean_error(result, "no complete checkpoint", "--save-steps")

    result = invoke("train", "--resume", baseline, "--r", 4)  # --lr, --max-grad-norm, --bf16 may change
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "--resume" in error[0] and "--r" in error[0], result.stderr

    two = tmp_path / "two-processes"
    shutil.copytree(baseline, two)
    state_file = two / checkpoint.DIR / "step-9" / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    state["world_size"] = 2
    state_file.write_text(json.dumps(state))
    result = invoke("train", "--resume", two)
    assert_clean_error(result, "step-9", "2 process", "--nproc 2")


def test_early_stopping_needs_more_than_one_evaluation(tmp_path, train):
    result = train(tmp_path / "run", "--epochs", 1, "--early-stopping", 2, expect_ok=False)
    assert_clean_error(result, "--early-stopping", "--eval-steps")


# -- keep-best and early stopping ---------------------------------------------------------


@pytest.fixture
def scripted_accuracy(monkeypatch):
    """``script(values)``: evaluations report these accuracies in turn (the first: before
    training); losses and everything else are the real ones."""
    finish = ClassifyTask.finish_eval

    def script(values: list[float]) -> None:
        queue = list(values)

        def scripted(self, sums):
            result = finish(self, sums)
            result["accuracy"] = queue.pop(0)
            return result

        monkeypatch.setattr(ClassifyTask, "finish_eval", scripted)

    return script


ACCURACIES = [0.3, 0.4, 0.7, 0.5, 0.7, 0.6, 0.2]  # before, then steps 1..6: the best is step 2


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best(tmp_path, train, scripted_accuracy, keep_best):
    scripted_accuracy(ACCURACIES)
    out = tmp_path / "run"
    train(out, "--max-steps", 6, "--eval-steps", 1, "--save-steps", 1, "--lr", 2e-2,
          *(["--keep-best"] if keep_best else []))
    found = evals(out)
    assert [found[s]["accuracy"] for s in range(7)] == ACCURACIES
    during = {s: e for s, e in found.items() if s > 0}
    best_step = max(during, key=lambda s: (during[s]["accuracy"], -s))  # the first of the best
    assert best_step == 2
    got = summary(out)
    assert got["best_step"] == best_step and got["steps"] == 6 and not got["stopped_early"]
    adapter = out / "adapter"
    if keep_best:
        assert (got["adapter_step"], got["adapter_is"]) == (best_step, "best")
        assert got["eval"] == found[best_step]
        assert_same_adapter(adapter, out / "best", atol=0)
        assert_same_adapter(adapter, out / checkpoint.DIR / f"step-{best_step}" / checkpoint.ADAPTER_DIR, atol=0)
        assert json.loads((adapter / "labels.json").read_text()) == json.loads(
            (out / checkpoint.DIR / "step-6" / checkpoint.ADAPTER_DIR / "labels.json").read_text())
    else:
        assert (got["adapter_step"], got["adapter_is"]) == (6, "last")
        assert got["eval"] == found[6]
        assert not (out / "best").exists()
        assert_same_adapter(adapter, out / checkpoint.DIR / "step-6" / checkpoint.ADAPTER_DIR, atol=0)
    # the best and the last adapters differ: the comparison above tells them apart
    assert max_difference(tensors(out / checkpoint.DIR / "step-2" / checkpoint.ADAPTER_DIR),
                          tensors(out / checkpoint.DIR / "step-6" / checkpoint.ADAPTER_DIR)) > 1e-4


def _expected_stop(accuracies: list[float], patience: int) -> tuple[int | None, int]:
    """(the step training stops at, the best step) for evaluations at steps 1, 2, ...: stop at
    the ``patience``-th evaluation in a row that is not better than the best so far."""
    best, best_step, bad = None, None, 0
    for step, value in enumerate(accuracies, 1):
        if best is None or value > best:
            best, best_step, bad = value, step, 0
        else:
            bad += 1
            if bad >= patience:
                return step, best_step
    return None, best_step


def test_early_stopping_counts_evaluations_without_improvement(tmp_path, train, scripted_accuracy):
    # improvements at steps 1, 2 and 4 reset the count; 5 and 6 are not better than 4 (a tie is not)
    script = [0.3, 0.4, 0.5, 0.5, 0.7, 0.6, 0.7, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    assert _expected_stop(script[1:], 2) == (6, 4)
    scripted_accuracy(script)
    out = tmp_path / "run"
    train(out, "--max-steps", 12, "--eval-steps", 1, "--early-stopping", 2)
    got = summary(out)
    assert got["stopped_early"] is True and got["steps"] == 6 and got["best_step"] == 4
    assert got["eval"] == evals(out)[6] and got["adapter_step"] == 6
    assert sorted(losses(out)) == list(range(1, 7)) and sorted(evals(out)) == list(range(7))


def test_early_stopping_on_a_real_run_agrees_with_its_metrics(tmp_path, train):
    out = tmp_path / "run"
    train(out, "--max-steps", 15, "--eval-steps", 1, "--early-stopping", 3, "--lr", 5e-2)
    found = evals(out)
    accuracies = [found[s]["accuracy"] for s in sorted(found) if s > 0]
    stop, best_step = _expected_stop(accuracies, 3)
    got = summary(out)
    assert got["best_step"] == best_step
    assert got["stopped_early"] is (stop is not None)
    assert got["steps"] == (stop or 15) == max(losses(out))


def test_early_stopping_with_keep_best_resumes_to_the_same_result(tmp_path, train, scripted_accuracy):
    """A run that stopped early keeps its best adapter; resuming its last checkpoint (written
    after the evaluation that stopped it) ends the same way without training further."""
    scripted_accuracy([0.3, 0.5, 0.6, 0.6, 0.4, 0.9])
    out = tmp_path / "run"
    train(out, "--max-steps", 5, "--eval-steps", 1, "--save-steps", 1, "--early-stopping", 2, "--keep-best")
    got = summary(out)
    assert (got["steps"], got["best_step"], got["adapter_step"], got["stopped_early"]) == (4, 2, 2, True)
    saved = tensors(out / "adapter")
    before = records(out)
    shutil.rmtree(out / "adapter")
    result = invoke("train", "--resume", out, "--quiet")
    assert result.exit_code == 0, result.output
    again = summary(out)
    assert (again["steps"], again["best_step"], again["adapter_step"], again["eval"]) == (4, 2, 2, got["eval"])
    assert records(out) == before
    assert max_difference(tensors(out / "adapter"), saved) == 0


# -- gradient checkpointing ---------------------------------------------------------------


def _lora_bert() -> nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(dropout=0.0, vocab_size=120, num_labels=3))
    peftkit.apply(model, peftkit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                                            task_type="SEQ_CLS"))
    with torch.no_grad():  # B starts at zero, which would give A no gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.train()


def _lora_grads(model: nn.Module) -> tuple[dict[str, torch.Tensor | None], list[int]]:
    # Hooks on a module inside each block: transformers checkpoints a block's ``forward``, so the
    # block's own hooks stay outside the recomputation, those of its parts run again.
    calls = [0] * len(model.bert.encoder.layer)
    hooks = [layer.intermediate.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.bert.encoder.layer)]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 120, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1])).loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: (p.grad.clone() if p.grad is not None else None)
             for n, p in model.named_parameters() if "lora_" in n}
    return grads, calls


def test_gradient_checkpointing_gives_the_same_gradients():
    from peftkit.train.engine import enable_gradient_checkpointing

    plain = _lora_bert()
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    assert not checkpointed.bert.embeddings.word_embeddings.weight.requires_grad  # the frozen-embedding case

    want, plain_calls = _lora_grads(plain)
    got, calls = _lora_grads(checkpointed)
    assert plain_calls == [1, 1]
    assert calls == [2, 2]  # each block ran again in the backward pass: checkpointing is on
    assert len(want) == 8  # A and B of query and value in 2 layers
    for name in want:
        assert got[name] is not None, f"{name}: no gradient"
        assert want[name].abs().sum() > 0, name
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-5), name


def test_gradient_checkpointing_needs_a_model_that_supports_it():
    from peftkit.train.engine import enable_gradient_checkpointing

    with pytest.raises(ConfigError, match="--gradient-checkpointing: Sequential does not support it"):
        enable_gradient_checkpointing(nn.Sequential(nn.Linear(2, 2)))


def test_gradient_checkpointing_through_the_cli(workdir, train, baseline):
    """The recomputation replays the dropout masks of the forward pass (and leaves the global RNG
    as it was), so the run reaches the adapter of the run without checkpointing."""
    out = workdir / "checkpointed"
    train(out, *RUN, "--gradient-checkpointing")
    assert summary(out)["options"]["gradient_checkpointing"] is True
    assert losses(out) == pytest.approx(losses(baseline), abs=1e-5)
    assert_same_adapter(out / "adapter", baseline / "adapter", atol=1e-5)


# -- bf16 ---------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu(tmp_path, train, monkeypatch):
    seen: list[tuple[bool, torch.dtype]] = []
    loss_sum = ClassifyTask.loss_sum

    def spy(self, model, batch):
        outputs = []
        hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.dtype))
                 for m in model.modules() if type(m) is nn.Linear]
        try:
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return loss_sum(self, model, batch)
        finally:
            for h in hooks:
                h.remove()
            assert outputs and set(outputs) == {torch.bfloat16}, outputs

    monkeypatch.setattr(ClassifyTask, "loss_sum", spy)
    out = tmp_path / "run"
    train(out, "--max-steps", 4, "--bf16", "--lr", 1e-2)
    assert seen == [(True, torch.bfloat16)] * 4
    assert all(math.isfinite(v) for v in losses(out).values()) and len(losses(out)) == 4
    weights = tensors(out / "adapter")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # it trained
    got = summary(out)
    assert got["options"]["bf16"] is True and math.isfinite(got["eval"]["loss"])


# -- schedules ----------------------------------------------------------------------------


def _rates(name: str, warmup: int, total: int) -> list[float]:
    from peftkit.train.loop import make_schedule

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = make_schedule(name, optimizer, warmup, total)
    rates = []
    for _ in range(total):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return rates


def test_schedules():
    # warmup: 1/3, 2/3, then the peak at step 2
    assert _rates("constant", 2, 8) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1])
    cosine = _rates("cosine", 2, 10)
    assert cosine[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cosine[6] == pytest.approx(0.5)  # half way through the 8 decaying steps
    assert cosine[4] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine == pytest.approx([1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert _rates("linear", 2, 10) == pytest.approx([1 / 3, 2 / 3] + [(8 - k) / 8 for k in range(8)])
    assert _rates("cosine", 0, 4) == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                                     0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_unknown_schedule_is_a_config_error():
    from peftkit.train.loop import make_schedule

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="--scheduler: expected one of linear, cosine, constant, found 'step'"):
        make_schedule("step", optimizer, 0, 10)


# -- the data order -------------------------------------------------------------------------


def test_shard_order_deals_each_step_the_examples_of_one_large_batch():
    from peftkit.train.loop import ShardOrder

    n, b = 18, 3
    for epoch in (0, 1):
        single = ShardOrder(n, seed=7, shuffle=True)
        ranks = [ShardOrder(n, seed=7, shuffle=True, rank=r, world=2) for r in range(2)]
        for s in (single, *ranks):
            s.set_position(epoch, 0)
        whole = list(single)
        parts = [list(s) for s in ranks]
        assert sorted(whole) == list(range(n)) and len(parts[0]) == len(parts[1]) == 9
        for k in range(3):
            step = set(parts[0][k * b:(k + 1) * b]) | set(parts[1][k * b:(k + 1) * b])
            assert step == set(whole[k * 2 * b:(k + 1) * 2 * b]), (epoch, k)
    # another epoch, another order; the same epoch, the same order
    first, second = ShardOrder(n, 7, True), ShardOrder(n, 7, True)
    second.set_position(1, 0)
    assert list(first) != list(second) and list(first) == list(ShardOrder(n, 7, True))
    assert list(ShardOrder(n, 7, False)) == list(range(n))

    # an odd count: padded by wrapping around, every example dealt out
    odd = [ShardOrder(17, 7, True, rank=r, world=2) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 9
    assert set(odd[0]) | set(odd[1]) == set(range(17))


def test_shard_order_position_skips_what_was_used():
    from peftkit.train.loop import ShardOrder

    for rank, world in [(0, 1), (1, 2)]:
        order = ShardOrder(18, 3, True, rank=rank, world=world)
        order.set_position(2, 0)
        full = list(order)
        order.set_position(2, 5)
        assert list(order) == full[5:] and len(order) == len(full) - 5
        order.set_position(2, len(full) + 4)
        assert list(order) == [] and len(order) == 0


def test_shard_order_leaves_the_global_rngs_alone():
    from torch.utils.data import DataLoader

    from peftkit.train.loop import ShardOrder

    torch.manual_seed(0)
    random.seed(0)
    state, py_state = torch.get_rng_state(), random.getstate()
    order = ShardOrder(18, 5, True)
    for epoch in range(3):
        order.set_position(epoch, 0)
        list(order)
    # as the engine iterates it: a DataLoader with its own generator
    loader = DataLoader(list(range(18)), batch_size=4, sampler=order, generator=torch.Generator())
    for epoch in range(2):
        order.set_position(epoch, 4)
        assert sum(len(b) for b in loader) == 14
    assert torch.equal(torch.get_rng_state(), state)
    assert random.getstate() == py_state


# -- TensorBoard ----------------------------------------------------------------------------


def test_tensorboard_scalars(tmp_path, train):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(out, "--max-steps", 4, "--eval-steps", 2, "--tensorboard")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/loss"} <= tags and "eval/n" not in tags
    train_loss = {e.step: e.value for e in board.Scalars("train/loss")}
    assert train_loss == pytest.approx(losses(out), abs=1e-5)
    accuracy = {e.step: e.value for e in board.Scalars("eval/accuracy")}
    assert accuracy == pytest.approx({s: e["accuracy"] for s, e in evals(out).items()}, abs=1e-6)
    assert sorted(accuracy) == [0, 2, 4]


# -- task inference -------------------------------------------------------------------------


def test_infer_task(tmp_path):
    from peftkit.train.tasks import infer_task

    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    assert infer_task(None) == "classify"
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    assert infer_task(str(images)) == "image-classify"
    assert infer_task(write("a.jsonl", '\n{"text": "hi", "label": "x"}\n')) == "classify"
    assert infer_task(write("b.jsonl", '{"Text": "hi", "Label": 1}\n')) == "classify"
    assert infer_task(write("c.jsonl", '{"prompt": "2+2=", "response": "4"}\n')) == "causal-lm"
    assert infer_task(write("d.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n')) == "causal-lm"
    assert infer_task(write("e.jsonl", '{"text": "just text"}\n')) == "causal-lm"
    with pytest.raises(DataError, match="'Prompt'"):  # the causal-LM reader's names are case-sensitive
        infer_task(write("f.jsonl", '{"Prompt": "2+2=", "Response": "4"}\n'))
    assert infer_task(write("f.csv", "text,label\nhi,x\n")) == "classify"
    assert infer_task(write("g.tsv", "text\tlabel\nhi\tx\n")) == "classify"
    with pytest.raises(DataError) as info:
        infer_task(write("h.jsonl", '{"question": "q", "answer": "a"}\n'))
    message = str(info.value)
    assert "'question', 'answer'" in message and "--task" in message and "h.jsonl" in message
    with pytest.raises(DataError, match="empty"):
        infer_task(write("i.jsonl", "\n"))
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        infer_task(write("j.jsonl", "\n{nope\n"))


# -- sentence pairs -------------------------------------------------------------------------

PAIRS = [("the cat sleeps", "a cat is asleep", "yes"), ("the cat sleeps", "stocks fell", "no"),
         ("the band played", "music was heard", "yes"), ("the bank raised rates", "the dog barked", "no"),
         ("she pays her loan", "money is owed", "yes"), ("the drummer lost a stick", "the loan is paid", "no")]


@pytest.fixture(scope="module")
def pair_files(workdir) -> tuple[str, str]:
    path_csv = workdir / "pairs.csv"
    with open(path_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence1", "sentence2", "label"])
        writer.writerows(PAIRS * 3)
    path_jsonl = workdir / "pairs.jsonl"
    path_jsonl.write_text("".join(json.dumps({"text": a, "text_pair": b, "label": lab}) + "\n" for a, b, lab in PAIRS))
    return str(path_csv), str(path_jsonl)


def test_sentence_pairs_are_read_and_tokenized_as_pairs(pair_files, tiny_model):
    from transformers import AutoTokenizer

    from peftkit.train.data import Collate, LabelMap, TextClassificationSet, read_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for path in pair_files:
        examples = read_examples(path)
        assert [(e.text, e.pair, e.label) for e in examples[:len(PAIRS)]] == PAIRS
        labels = LabelMap.from_examples(examples, path)
        batch = Collate(tokenizer, 64)(list(TextClassificationSet(examples[:4], labels, path)))
        ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
        for row in range(4):
            real = ids[row][mask[row].bool()]
            assert (real == tokenizer.sep_token_id).sum() == 2 and real[-1] == tokenizer.sep_token_id
            first_sep = (real == tokenizer.sep_token_id).nonzero()[0].item()
            row_types = types[row][mask[row].bool()]
            assert (row_types[:first_sep + 1] == 0).all() and (row_types[first_sep + 1:] == 1).all()
            assert row_types.sum() > 0
            a, b = examples[row].text, examples[row].pair
            assert tokenizer.decode(real, skip_special_tokens=True) == f"{a} {b}"
        assert batch["labels"].tolist() == [labels.label2id[e.label] for e in examples[:4]]


def test_a_pair_file_needs_a_second_text_on_every_line(tmp_path):
    from peftkit.train.data import read_examples

    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "text_pair": "b", "label": 1}\n\n{"text": "c", "label": 0}\n')
    with pytest.raises(DataError) as info:
        read_examples(path)
    message = str(info.value)
    assert "line 3" in message and "line 1 has one" in message and "text_pair" in message
    path.write_text('{"text": "a", "label": 1}\n{"text": "c", "sentence2": "d", "label": 0}\n')
    with pytest.raises(DataError, match="line 2: has 'sentence2' but line 1 has no second text"):
        read_examples(path)


def test_training_on_sentence_pairs(tmp_path, tiny_model, pair_files):
    path_csv, path_jsonl = pair_files
    out = tmp_path / "run"
    result = invoke("train", "--model", tiny_model, "--data", path_csv, "--eval-data", path_jsonl,
                    "--max-steps", 3, "--batch-size", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert "(sentence pairs)" in result.output
    got = summary(out)
    assert got["labels"] == ["no", "yes"] and got["eval"]["n"] == len(PAIRS) and got["steps"] == 3
    assert len(losses(out)) == 3 and all(math.isfinite(v) for v in losses(out).values())
    result = invoke("eval", "--adapter", out, "--quiet")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated.pop("labels_from") == "labels.json" and evaluated == pytest.approx(got["eval"])


# -- run directories, limits and flag combinations -----------------------------------------


def test_save_limit_keeps_the_most_recent_checkpoints(tmp_path, train):
    out = tmp_path / "limited"
    train(out, "--max-steps", 8, "--save-steps", 2, "--save-limit", 2, "--eval-steps", 4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6", "step-8"]
    assert checkpoint.latest(out).name == "step-8"


def test_a_fresh_run_replaces_an_earlier_runs_checkpoints(tmp_path, train):
    out = tmp_path / "reused"
    train(out, "--max-steps", 4, "--save-steps", 2, "--keep-best", "--eval-steps", 2)
    assert (out / "checkpoints" / "step-4").is_dir() and (out / "best").is_dir()
    train(out, "--max-steps", 2)
    assert not (out / "checkpoints").exists() and not (out / "best").exists()  # --resume cannot pick them up
    assert_clean_error(invoke("train", "--resume", out), "no complete checkpoint")


def test_flag_combinations_refused_up_front(tmp_path, train):
    result = train(tmp_path / "a", "--method", "prefix", "--gradient-checkpointing", "--max-steps", 1,
                   expect_ok=False)
    assert_clean_error(result, "--gradient-checkpointing", "--method prefix")
    assert not (tmp_path / "a" / "metrics.jsonl").exists()  # refused before any work
    assert_clean_error(train(tmp_path / "b", "--save-limit", 2, "--max-steps", 1, expect_ok=False), "--save-steps")


def test_a_yaml_switch_is_turned_off_by_its_no_flag(tmp_path, train):
    config = tmp_path / "run.yaml"
    config.write_text("bf16: true\nmax_steps: 1\n")
    out = tmp_path / "off"
    train(out, "--config", config, "--no-bf16")
    assert json.loads((out / "summary.json").read_text())["options"]["bf16"] is False

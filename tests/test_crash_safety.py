"""Nothing lost: a crash, a full disk or a diverging loss leaves every earlier file whole.

A process is killed (``os.fork`` + ``os._exit`` from ``peftkit.atomic``'s fault hook) at many
points of a checkpoint write and of ``peftkit.save``; afterwards the latest checkpoint loads,
``--resume`` reaches the uninterrupted run's adapter, and an adapter directory is the old one
or the new one, whole. A full disk (the hook raising ENOSPC) during ``peftkit.save``, a
checkpoint and ``summary.json`` leaves the previous files and one ``Error:`` line naming the
file. A NaN loss or non-finite parameters stop the run with the step and how to continue,
and ``--resume`` with a lower ``--lr`` (and the other overrides) completes it.

Runs use the tiny BERT (with dropout: the RNG states must be restored) and the 18/6 topic
files of ``cli_helpers``; 4 steps of batch 4, a checkpoint every 2.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit import atomic
from peftkit.train import checkpoint
from peftkit.train.classify import ClassifyTask

from cli_helpers import assert_clean_error, bert_config, invoke, save_tiny_bert, write_topic_files
from conftest import tiny_bert

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

RUN = ("--max-steps", 4, "--save-steps", 2)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (and none to lose across a fork)."""


@pytest.fixture(autouse=True)
def _no_fault():
    yield
    atomic.set_fault(None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="module")
def tiny_model(workdir) -> str:
    return save_tiny_bert(workdir / "tiny-bert", dropout=0.1)


@pytest.fixture(scope="module")
def data_files(workdir) -> tuple[str, str]:
    return write_topic_files(workdir)


@pytest.fixture(scope="module")
def train_args(tiny_model, data_files):
    def args(out: Path, *flags) -> list:
        return ["train", "--quiet", "--model", tiny_model, "--data", data_files[0], "--eval-data", data_files[1],
                "--batch-size", 4, "--out", out, *flags]
    return args


@pytest.fixture(scope="module")
def baseline(workdir, train_args) -> tuple[Path, list[tuple[str, str]]]:
    """An uninterrupted run, and every fault-hook call it made: (label, path)."""
    out = workdir / "baseline"
    calls: list[tuple[str, str]] = []
    atomic.set_fault(lambda label, path: calls.append((label, path)))
    try:
        result = invoke(*train_args(out, *RUN))
    finally:
        atomic.set_fault(None)
    assert result.exit_code == 0, result.output
    assert visible(out / checkpoint.DIR) == ["step-2", "step-4"]
    return out, calls


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / WEIGHTS))


def loads(adapter_dir: Path) -> None:
    """The directory is a whole adapter: config and weights agree (``peftkit.load`` is strict)."""
    from transformers import BertForSequenceClassification

    peftkit.load(BertForSequenceClassification(bert_config(num_labels=3)), adapter_dir)


def in_child(work, hook) -> int:
    """Run ``work()`` in a forked process with fault hook ``hook``; its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            torch.set_num_threads(1)
            atomic.set_fault(hook)
            work()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    return os.WEXITSTATUS(status)


def kill_at(k: int, label: str):
    """A hook that ends the process at its ``k``-th call (1-based), which must have ``label``."""
    count = [0]

    def hook(got: str, path: str) -> None:
        count[0] += 1
        if count[0] == k:
            os._exit(1 if got == label else 3)

    return hook


def raise_at(predicate):
    """A hook that raises ENOSPC (with no file name, as ``write`` does) where ``predicate``."""
    def hook(label: str, path: str) -> None:
        if predicate(label, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return hook


# -- a process killed while writing a checkpoint -------------------------------------------


def test_killed_during_a_checkpoint_the_latest_loads_and_resume_reaches_the_same_adapter(workdir, train_args,
                                                                                          baseline):
    whole, calls = baseline
    step4 = [i for i, (_, path) in enumerate(calls) if f"{os.sep}{checkpoint.DIR}{os.sep}" in path
             and ".step-4." in path or path.endswith(f"{checkpoint.DIR}{os.sep}step-4")]
    step2 = [i for i, (_, path) in enumerate(calls) if ".step-2." in path or path.endswith("step-2")]
    committed = next(i for i in step4 if calls[i][0] == "dir:renamed")
    # every other point of step-4's write, its last four (rename and after), two of step-2's
    points = sorted(set(step4[::2] + step4[-4:] + [step2[len(step2) // 2], step2[-4]]))
    assert len(points) >= 25 and len({calls[i][0] for i in points}) >= 10

    for n, i in enumerate(points):
        label, path = calls[i]
        out = workdir / f"killed-{n}"
        status = in_child(lambda: invoke(*train_args(out, *RUN)), kill_at(i + 1, label))
        assert status == 1, (status, label, path)  # killed there, with the label expected
        where = (label, os.path.relpath(path, whole))

        ckpt = checkpoint.latest(out)
        if i in step2:  # no checkpoint had been completed
            assert ckpt is None and visible(out / checkpoint.DIR) in ([], ["step-2"]), where
            assert (out / checkpoint.DIR / "step-2").exists() == (i > step2[-4]), where
            continue
        expected = "step-4" if i >= committed else "step-2"
        assert ckpt is not None and ckpt.name == expected, where
        assert visible(out / checkpoint.DIR) == sorted({"step-2", expected}), where
        state, trainer = checkpoint.read_state(ckpt)
        assert state["step"] == int(expected[5:]) and set(trainer) == {"model", "optimizer", "scheduler", "rng"}
        loads(ckpt / checkpoint.ADAPTER_DIR)
        assert same_tensors(adapter_tensors(ckpt / checkpoint.ADAPTER_DIR),
                            adapter_tensors(whole / checkpoint.DIR / expected / checkpoint.ADAPTER_DIR)), where

        result = invoke("train", "--resume", out, "--quiet")
        assert result.exit_code == 0, (where, result.output)
        assert f"resuming from {expected}" in result.output
        assert same_tensors(adapter_tensors(out / "adapter"), adapter_tensors(whole / "adapter")), where
        assert visible(out / checkpoint.DIR) == ["step-2", "step-4"]
        assert hidden(out / checkpoint.DIR) == [], where  # the killed write's leftovers are gone
        shutil.rmtree(out)


def test_latest_ignores_leftovers_and_the_next_checkpoint_removes_them(tmp_path):
    out = tmp_path
    root = out / checkpoint.DIR
    checkpoint.write_checkpoint(out, 2, lambda tmp: [(tmp / f).write_text("{}") for f in
                                                     (checkpoint.STATE_FILE, checkpoint.TRAINER_FILE)])
    for name in (".step-4.tmp-abc123", ".step-4.old-xyz", ".step-3-k2j4x_"):  # look complete, are not
        shutil.copytree(root / "step-2", root / name)
    assert checkpoint.latest(out) == root / "step-2"
    checkpoint.write_checkpoint(out, 4, lambda tmp: [(tmp / f).write_text("{}") for f in
                                                     (checkpoint.STATE_FILE, checkpoint.TRAINER_FILE)])
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"]
    assert checkpoint.latest(out) == root / "step-4"


# -- peftkit.save ------------------------------------------------------------------------


@pytest.fixture
def two_adapters():
    """A model with two different adapters: "a" (r 4 on query/value), "b" (r 2 on key)."""
    model = tiny_bert()
    peftkit.apply(model, peftkit.LoraConfig(r=4, target_modules=["query", "value"]), "a")
    peftkit.apply(model, peftkit.LoraConfig(r=2, target_modules=["key"]), "b")
    with torch.no_grad():  # B starts at zero: make the saved tensors tell the versions apart
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``: relative path -> bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def restore(directory: Path, files: dict[str, bytes]) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)


def test_save_replaces_the_adapter_directory_whole_and_keeps_the_users_files(tmp_path, two_adapters):
    """Killed at any point of ``save`` over an existing adapter, the directory holds the old
    adapter or the new one, whole (old code: a new weights file beside the old config), and the
    files the user had there."""
    model = two_adapters
    target = tmp_path / "adapter"
    peftkit.save(model, target, "a")
    (target / "labels.json").write_text('{"id2label": {}}')
    (target / "notes.txt").write_text("mine")
    (target / "extra").mkdir()
    (target / "extra" / "data.bin").write_bytes(b"\x00\x01")
    versions = {}
    for name in ("a", "b"):
        peftkit.save(model, tmp_path / name, name)
        versions[peftkit.read_config(tmp_path / name).r] = adapter_tensors(tmp_path / name)
    before = snapshot(target)

    calls = []
    scratch = tmp_path / "scratch"
    shutil.copytree(target, scratch)
    atomic.set_fault(lambda label, path: calls.append(label))
    peftkit.save(model, scratch, "b")
    atomic.set_fault(None)
    assert {"file:written", "dir:carried", "dir:renaming", "dir:renamed", "dir:removing-old"} <= set(calls)

    for k, label in enumerate(calls, 1):
        status = in_child(lambda: peftkit.save(model, target, "b"), kill_at(k, label))
        assert status == 1, (k, label)
        r = peftkit.read_config(target).r
        assert same_tensors(adapter_tensors(target), versions[r], atol=0), (k, label)
        peftkit.load(tiny_bert(), target)  # config and weights of one version
        assert (r == 2) == (calls.index("dir:renamed") < k), (k, label)
        assert (target / "notes.txt").read_text() == "mine" and (target / "extra" / "data.bin").read_bytes() == b"\x00\x01"
        assert (target / "labels.json").is_file()
        if r == 4:
            assert snapshot(target) == before
        for leftover in hidden(tmp_path):  # a killed save leaves hidden siblings only
            shutil.rmtree(tmp_path / leftover)
        restore(target, before)

    notes = os.stat(target / "notes.txt")
    peftkit.save(model, target, "b")
    assert peftkit.read_config(target).r == 2 and same_tensors(adapter_tensors(target), versions[2], atol=0)
    assert sorted(p.name for p in target.iterdir()) == sorted(["extra", "labels.json", "notes.txt", WEIGHTS, CONFIG])
    assert os.stat(target / "notes.txt").st_ino == notes.st_ino  # carried over as a hard link
    assert hidden(tmp_path) == []


def test_save_fallback_without_an_atomic_exchange_recovers_the_old_directory(tmp_path, two_adapters, monkeypatch):
    """Where directories cannot be swapped in one step, the old one is renamed aside first; a
    crash in between leaves it aside, and the next write puts it back before replacing it."""
    model = two_adapters
    target = tmp_path / "adapter"
    peftkit.save(model, target, "a")
    (target / "notes.txt").write_text("mine")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    calls = []
    atomic.set_fault(lambda label, path: calls.append(label))
    shutil.copytree(target, tmp_path / "scratch")
    peftkit.save(model, tmp_path / "scratch", "b")
    atomic.set_fault(None)
    k = calls.index("dir:aside") + 1
    assert in_child(lambda: peftkit.save(model, target, "b"), kill_at(k, "dir:aside")) == 1
    assert not target.exists() and any(n.startswith(".adapter.old-") for n in hidden(tmp_path))

    peftkit.save(model, target, "b")
    assert peftkit.read_config(target).r == 2 and (target / "notes.txt").read_text() == "mine"
    assert not any(n.startswith(".adapter.old-") for n in hidden(tmp_path))


def test_a_full_disk_during_save_leaves_the_previous_adapter(tmp_path, two_adapters):
    model = two_adapters
    target = tmp_path / "adapter"
    peftkit.save(model, target, "a")
    (target / "notes.txt").write_text("mine")
    before = snapshot(target)
    for label in ("file:written", "fsync:before", "dir:renaming"):
        atomic.set_fault(raise_at(lambda got, path, label=label: got == label))
        with pytest.raises(OSError) as info:
            peftkit.save(model, target, "b")
        atomic.set_fault(None)
        assert info.value.errno == errno.ENOSPC
        # named under its final path, not the hidden temporary one
        assert Path(info.value.filename).parent == target or Path(info.value.filename) == target, info.value
        assert snapshot(target) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left
        peftkit.load(tiny_bert(), target)
    atomic.set_fault(raise_at(lambda got, path: got == "file:written" and path.endswith(WEIGHTS)))
    with pytest.raises(OSError) as info:
        peftkit.save(model, target, "b")
    assert info.value.filename == str(target / WEIGHTS)


# -- a full disk in a training run ---------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_checkpoint(workdir, train_args, baseline):
    whole, _ = baseline
    out = workdir / "full-checkpoint"
    atomic.set_fault(raise_at(lambda label, path: label == "file:written" and ".step-4." in path
                              and path.endswith(checkpoint.TRAINER_FILE)))
    result = invoke(*train_args(out, *RUN))
    atomic.set_fault(None)
    assert_clean_error(result, str(out / checkpoint.DIR / "step-4" / checkpoint.TRAINER_FILE),
                       "No space left on device")
    root = out / checkpoint.DIR
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]  # no step-4, no temporary directory
    assert not (out / "adapter").exists()
    assert checkpoint.read_state(root / "step-2")[0]["step"] == 2
    loads(root / "step-2" / checkpoint.ADAPTER_DIR)
    assert same_tensors(adapter_tensors(root / "step-2" / checkpoint.ADAPTER_DIR),
                        adapter_tensors(whole / checkpoint.DIR / "step-2" / checkpoint.ADAPTER_DIR))


def test_a_full_disk_during_summary_json_keeps_the_previous_summary(workdir, baseline):
    whole, _ = baseline
    out = workdir / "full-summary"
    shutil.copytree(whole, out)
    before = (out / "summary.json").read_bytes()
    atomic.set_fault(raise_at(lambda label, path: label == "file:written" and path.endswith("summary.json")))
    result = invoke("train", "--resume", out, "--quiet")  # the finished run: rewrites adapter/, summary
    atomic.set_fault(None)
    assert_clean_error(result, str(out / "summary.json"), "No space left on device")
    assert (out / "summary.json").read_bytes() == before
    json.loads(before)
    assert hidden(out) == []
    loads(out / "adapter")
    assert same_tensors(adapter_tensors(out / "adapter"), adapter_tensors(whole / "adapter"))


# -- a loss that becomes NaN ---------------------------------------------------------------


def nan_at(monkeypatch, step: int, kind: str) -> None:
    """The loss of training step ``step`` (one micro-batch a step) made NaN (``kind="loss"``), or
    finite but with NaN gradients (``kind="grad"``): the step then makes the parameters NaN."""
    real = ClassifyTask.loss_sum
    calls = [0]

    def loss_sum(self, model, batch):
        calls[0] += 1
        loss = real(self, model, batch)
        if calls[0] != step:
            return loss
        if kind == "loss":
            return loss * float("nan")
        param = next(p for p in model.parameters() if p.requires_grad)
        return loss + (param.sum() * 0).abs().sqrt()  # value + 0, gradient 0 * inf = NaN

    monkeypatch.setattr(ClassifyTask, "loss_sum", loss_sum)


def test_a_nan_loss_stops_keeps_the_last_checkpoint_and_resume_with_a_lower_lr_completes(
        workdir, train_args, monkeypatch):
    out = workdir / "nan-loss"
    flags = ("--max-steps", 6, "--save-steps", 2, "--max-grad-norm", 0, "--bf16")
    nan_at(monkeypatch, 5, "loss")
    result = invoke(*train_args(out, *flags))
    monkeypatch.undo()
    step4 = out / checkpoint.DIR / "step-4"
    assert_clean_error(result, "step 5", "nan", str(step4), f"--resume {out}", "--lr 0.0002",
                       "lower than the current 0.002", "--max-grad-norm", "--no-bf16")
    assert visible(out / checkpoint.DIR) == ["step-2", "step-4"] and hidden(out / checkpoint.DIR) == []
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert checkpoint.read_state(step4)[0]["step"] == 4
    loads(step4 / checkpoint.ADAPTER_DIR)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == 4  # the bad step is not logged

    result = invoke("train", "--resume", out, "--quiet", "--lr", 2e-4, "--max-grad-norm", 1, "--no-bf16")
    assert result.exit_code == 0, result.output
    assert "--lr 0.0002 overrides the saved --lr 0.002" in result.output
    assert "--max-grad-norm 1 overrides the saved --max-grad-norm 0" in result.output
    assert "--no-bf16 overrides the saved --bf16" in result.output
    assert "resuming from step-4" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert (summary["options"]["lr"], summary["options"]["max_grad_norm"], summary["options"]["bf16"]) == (2e-4, 1.0, False)
    saved = json.loads((out / "options.json").read_text())  # a later --resume keeps them
    assert (saved["lr"], saved["max_grad_norm"], saved["bf16"]) == (2e-4, 1.0, False)
    rates = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "lr" in r}
    # linear schedule over 6 steps: step s runs at peak * (7 - s) / 6, the peak now 2e-4 from step 5
    assert rates == pytest.approx({s: (2e-3 if s <= 4 else 2e-4) * (7 - s) / 6 for s in range(1, 7)})
    loads(out / "adapter")


def test_parameters_that_become_nan_are_never_saved(workdir, train_args, monkeypatch):
    """A step with a finite loss but NaN gradients makes the adapter NaN: the checkpoint and
    best/ due at that step are refused; the earlier ones stay."""
    out = workdir / "nan-params"
    nan_at(monkeypatch, 4, "grad")
    result = invoke(*train_args(out, *RUN, "--eval-steps", 2, "--keep-best"))
    monkeypatch.undo()
    step2 = out / checkpoint.DIR / "step-2"
    assert_clean_error(result, "step 4", "no longer finite", str(step2), "--lr 0.0002")
    message = result.stderr
    assert "--max-grad-norm" not in message and "bf16" not in message  # clipping on, float32
    assert visible(out / checkpoint.DIR) == ["step-2"] and hidden(out / checkpoint.DIR) == []
    assert hidden(out) == [] and not (out / "adapter").exists()
    assert all(bool(t.isfinite().all()) for t in adapter_tensors(out / "best").values())
    assert same_tensors(adapter_tensors(out / "best"), adapter_tensors(step2 / checkpoint.ADAPTER_DIR), atol=0)


def test_resume_overrides_are_checked(workdir, baseline):
    whole, _ = baseline
    out = workdir / "bad-override"
    shutil.copytree(whole, out)
    before = (out / "options.json").read_text()
    assert_clean_error(invoke("train", "--resume", out, "--lr", -1), "--lr", "positive")
    assert (out / "options.json").read_text() == before
    result = invoke("train", "--resume", out, "--r", 4)
    assert result.exit_code == 2 and "--r" in result.stderr and "--resume" in result.stderr

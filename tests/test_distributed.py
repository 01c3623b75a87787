"""Two processes on CPU (torchrun, gloo): DDP and FSDP reach the single-process adapter.

With the same global batch (2 processes x 4 = 1 process x 8), dropout off and the same seed,
data-parallel training takes the same steps as one process, so the adapters agree to float
tolerance. The adapter a sharded (FSDP) run writes is complete: every tensor whole.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftkit.cli import cli

from cli_helpers import save_tiny_bert

TEXTS = {
    "sport": ["the team won the match", "she scored a late goal", "the striker missed a penalty",
              "fans filled the stadium", "the coach praised the defence", "a record crowd watched the final"],
    "food": ["the soup was too salty", "fresh bread from the oven", "he grilled the fish with lemon",
             "the cake needs more sugar", "we ate noodles for lunch", "the salad had ripe tomatoes"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # no dropout in the model: each process draws its own masks, so only a dropout-free run can
    # match one process exactly
    model_dir = save_tiny_bert(root / "tiny-bert", dropout=0.0)
    data = root / "train.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for label, texts in TEXTS.items():
            writer.writerows((t, label) for t in texts)
    return root, model_dir, str(data)


def train(setup, name: str, *flags) -> Path:
    root, model, data = setup
    out = root / name
    args = ["train", "--model", model, "--data", data, "--eval-data", data, "--max-steps", 4, "--lr", 1e-2,
            "--dropout", 0, "--out", out, "--quiet", *flags]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def single(setup) -> Path:
    return train(setup, "single", "--batch-size", 8)


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].shape == tb[key].shape, key
        torch.testing.assert_close(ta[key], tb[key], atol=2e-4, rtol=1e-3, msg=key)


def assert_loads(setup, run: Path) -> None:
    """The adapter loads into a fresh base (strictly: every key, every shape) and gives the run's
    final evaluation there."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 8
    result = CliRunner().invoke(cli, ["eval", "--adapter", str(run / "adapter"), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["n"] == summary["eval"]["n"] and metrics["accuracy"] == summary["eval"]["accuracy"]
    assert metrics["loss"] == pytest.approx(summary["eval"]["loss"], abs=1e-5)


def assert_resumes(run: Path) -> None:
    """Continued from its step-2 checkpoint, in the 2 processes its options name, a 4-step run
    writes the adapter and metrics it wrote without the interruption."""
    import shutil

    final = load_file(run / "adapter" / "adapter_model.safetensors")
    metrics = (run / "metrics.jsonl").read_text()
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "adapter")
    result = CliRunner().invoke(cli, ["train", "--resume", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    again = load_file(run / "adapter" / "adapter_model.safetensors")
    for key in final:
        torch.testing.assert_close(final[key], again[key], atol=1e-6, rtol=1e-5, msg=key)
    assert (run / "metrics.jsonl").read_text() == metrics


def test_ddp_two_processes_match_one(setup, single):
    run = train(setup, "ddp", "--batch-size", 4, "--nproc", 2, "--save-steps", 2)
    assert_same_adapter(single, run)
    assert_loads(setup, run)
    assert_resumes(run)
    one = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one] == [r["step"] for r in two]  # rank 0 alone wrote the log
    for a, b in zip(one, two):
        if "loss" in a:  # the step loss is the global batch's, on every process count
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        else:
            assert a["eval"]["n"] == b["eval"]["n"] == 12  # padding for the even split is not counted
            assert a["eval"]["loss"] == pytest.approx(b["eval"]["loss"], abs=1e-4)


def test_fsdp_two_processes_write_a_complete_adapter(setup, single):
    run = train(setup, "fsdp", "--batch-size", 4, "--nproc", 2, "--fsdp", "--save-steps", 2)
    assert_same_adapter(single, run)  # whole tensors, not one rank's shard
    assert_loads(setup, run)
    ckpt = load_file(run / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors")
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ckpt.items()} == {k: v.shape for k, v in final.items()}


def test_fsdp_run_resumes_in_two_processes(setup):
    """A sharded run continued from its step-2 checkpoint reaches the uninterrupted adapter
    (LoRA dropout on: every process's random numbers are restored)."""
    run = train(setup, "fsdp-resume", "--batch-size", 4, "--nproc", 2, "--fsdp", "--save-steps", 2, "--dropout", 0.1)
    assert_resumes(run)


def test_causal_lm_token_loss_is_normalised_across_processes(tmp_path):
    """Examples of different lengths: each process holds a different number of predicted tokens,
    and the step still averages over every token of the global batch, as one process does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from test_causal_lm import WORDS, _tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(WORDS) + 2, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    _tokenizer(False).save_pretrained(model_dir)
    rows = [{"prompt": " ".join(WORDS[i % 7: i % 7 + 2]), "response": " ".join(WORDS[: 3 + (5 * i) % 11])}
            for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    runs = {}
    for name, flags in (("one", ["--batch-size", 4]), ("two", ["--batch-size", 2, "--nproc", 2])):
        runs[name] = tmp_path / name
        args = ["train", "--model", model_dir, "--data", data, "--eval-data", data, "--max-steps", 3, "--lr", 1e-2,
                "--dropout", 0, "--out", runs[name], "--quiet", *flags]
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    assert json.loads((runs["two"] / "summary.json").read_text())["task"] == "causal-lm"
    assert_same_adapter(runs["one"], runs["two"])

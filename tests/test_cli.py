"""The `peftkit` command end to end, on a tiny BERT (random weights, MiniLM's tokenizer).

One short training run is shared by the tests that inspect its outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit
from cli_helpers import assert_clean_error, invoke, save_tiny_bert, write_topic_files

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_model(workdir) -> str:
    return save_tiny_bert(workdir / "tiny-bert")


@pytest.fixture(scope="module")
def data_files(workdir) -> tuple[str, str]:
    return write_topic_files(workdir)


@pytest.fixture(scope="module")
def run_dir(workdir, tiny_model, data_files) -> Path:
    train, evaluation = data_files
    out = workdir / "run"
    result = invoke("train", "--model", tiny_model, "--data", train, "--eval-data", evaluation,
                    "--max-steps", 7, "--batch-size", 4, "--lr", 5e-3, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# -- train --------------------------------------------------------------------------------


def test_train_writes_the_documented_files(run_dir):
    adapter = run_dir / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                   "labels.json", "train_args.json"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and config["r"] == 8
    assert "classifier" in config["modules_to_save"]
    labels = json.loads((adapter / "labels.json").read_text())
    assert labels["id2label"] == {"0": "money", "1": "music", "2": "pets"}
    assert labels["label2id"] == {"money": 0, "music": 1, "pets": 2}

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in steps] == list(range(1, 8))
    assert all(set(r) == {"step", "loss", "lr"} for r in steps)
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 7  # before training, ..., at the end
    assert all(set(r) == {"step", "eval"} and set(r["eval"]) == {"accuracy", "loss", "n"} for r in evals)
    assert max(r["lr"] for r in steps) == pytest.approx(5e-3)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval"] == evals[-1]["eval"] and summary["eval"]["n"] == 6
    assert summary["accuracy_before"] == evals[0]["eval"]["accuracy"]
    assert summary["method"] == "lora" and summary["model"].endswith("tiny-bert")
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["adapter_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert summary["train_seconds"] > 0 and summary["steps"] == 7
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run_dir.rglob(".*.tmp")]


def test_training_lowers_the_loss(workdir, tiny_model, data_files):
    """The tiny random model fits its training data: the loss on it falls epoch after epoch
    (too little signal reaches a random 32-wide model's [CLS] to rely on held-out examples)."""
    train, _ = data_files
    out = workdir / "fit"
    result = invoke("train", "--model", tiny_model, "--data", train, "--eval-data", train, "--max-steps", 40,
                    "--batch-size", 4, "--lr", 2e-2, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["eval"]["loss"] for r in rows if "eval" in r]
    assert len(losses) == 9  # before, then after each of 8 epochs of 5 steps
    assert losses[-1] < losses[4] < losses[0]


def test_same_seed_same_run(workdir, tiny_model, data_files, run_dir):
    train, evaluation = data_files
    out = workdir / "again"
    result = invoke("train", "--model", tiny_model, "--data", train, "--eval-data", evaluation,
                    "--max-steps", 7, "--batch-size", 4, "--lr", 5e-3, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    first = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert first == second


def test_quiet_prints_only_essential_lines(workdir, tiny_model, data_files):
    train, _ = data_files
    result = invoke("train", "--model", tiny_model, "--data", train, "--max-steps", 2, "--batch-size", 4,
                    "--out", workdir / "quiet", "-q")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"output: {workdir / 'quiet'}"
    assert [line.split(":")[0] for line in lines] == ["output", "before training", "after training (last adapter, step 2)",
                                                     "saved"]
    summary = json.loads((workdir / "quiet" / "summary.json").read_text())
    assert summary["eval"]["n"] == 3  # 20% of each label's 6 rows, rounded: 1 per label
    assert summary["train_examples"] == 15


def test_plain_progress_lines_when_not_a_terminal(workdir, tiny_model, data_files):
    train, evaluation = data_files
    result = invoke("train", "--model", tiny_model, "--data", train, "--eval-data", evaluation,
                    "--max-steps", 3, "--batch-size", 4, "--out", workdir / "lines")
    assert result.exit_code == 0, result.output
    progress = [line for line in result.stdout.splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in progress] == ["1/3", "2/3", "3/3"]
    assert "loss" in progress[-1] and "\r" not in result.output


def test_default_output_directory_is_printed_first(tmp_path, tiny_model, data_files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--model", tiny_model, "--data", data_files[0], "--max-steps", 1, "-q")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("output: runs/lora-")
    out = tmp_path / first.split(": ", 1)[1]
    assert (out / "summary.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()


# -- YAML config --------------------------------------------------------------------------


def test_yaml_config_and_flags_override_it(workdir, tiny_model, data_files):
    train, evaluation = data_files
    cfg = workdir / "run.yaml"
    cfg.write_text(f"model: {tiny_model}\ndata: {train}\neval-data: {evaluation}\nr: 4\nalpha: 32\n"
                   f"max_steps: 2\nbatch-size: 4\nlr: 1e-3\ntargets: query,key\nout: {workdir / 'yaml-run'}\n")
    result = invoke("train", "--config", cfg, "--r", 2, "--quiet")
    assert result.exit_code == 0, result.output
    config = json.loads((workdir / "yaml-run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2  # the flag wins
    assert config["lora_alpha"] == 32  # the file's value
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {"query", "key"}
    summary = json.loads((workdir / "yaml-run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["options"]["lr"] == 1e-3


def test_dora_method(workdir, tiny_model, data_files):
    out = workdir / "dora"
    result = invoke("train", "--method", "dora", "--model", tiny_model, "--data", data_files[0],
                    "--max-steps", 2, "--batch-size", 4, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    assert "LORA (DoRA)" in invoke("info", out).stdout
    assert json.loads((out / "summary.json").read_text())["method"] == "dora"


@pytest.mark.parametrize("method,peft_type", [("prompt", "PROMPT_TUNING"), ("ptuning", "P_TUNING"),
                                              ("prefix", "PREFIX_TUNING")])
def test_input_methods(workdir, tiny_model, data_files, method, peft_type):
    from peftkit.train.options import METHOD_DEFAULTS

    out = workdir / method
    result = invoke("train", "--method", method, "--virtual-tokens", 3, "--model", tiny_model, "--data", data_files[0],
                    "--eval-data", data_files[1], "--max-steps", 2, "--batch-size", 4, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["num_virtual_tokens"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["options"]["lr"] == METHOD_DEFAULTS[method]["lr"]
    assert peft_type in invoke("info", out).stdout
    got = json.loads(invoke("eval", "--adapter", out, "-q").stdout)
    assert got["accuracy"] == summary["eval"]["accuracy"] and got["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)
    assert_clean_error(invoke("merge", "--adapter", out, "--out", workdir / f"{method}-merged"), "cannot be merged")
    assert_clean_error(invoke("train", "--method", method, "--targets", "query", "--model", tiny_model,
                              "--data", data_files[0], "--out", workdir / "never"), "--targets")


def test_unknown_yaml_key_is_an_error_naming_key_and_file(workdir):
    cfg = workdir / "bad.yaml"
    cfg.write_text("r: 4\nlearning_rate: 0.1\n")
    assert_clean_error(invoke("train", "--config", cfg), "'learning_rate'", str(cfg), "unknown key")


# -- eval, merge, info --------------------------------------------------------------------


def test_eval_agrees_with_summary(run_dir, data_files):
    summary = json.loads((run_dir / "summary.json").read_text())
    result = invoke("eval", "--adapter", run_dir / "adapter", "--data", data_files[1])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert set(got) == {"accuracy", "loss", "n", "labels_from"} and got["labels_from"] == "labels.json"
    assert got["accuracy"] == summary["eval"]["accuracy"] and got["n"] == summary["eval"]["n"]
    assert got["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)
    # without --data/--model: the run's own model and evaluation data
    again = json.loads(invoke("eval", "--adapter", run_dir, "-q").stdout)
    assert again["accuracy"] == got["accuracy"] and again["loss"] == pytest.approx(got["loss"], rel=1e-5)


def test_eval_on_held_out_part_agrees_with_summary(workdir):
    summary = json.loads((workdir / "quiet" / "summary.json").read_text())
    got = json.loads(invoke("eval", "--adapter", workdir / "quiet", "-q").stdout)
    assert got["n"] == summary["eval"]["n"] and got["accuracy"] == summary["eval"]["accuracy"]
    assert got["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)


def test_merge_writes_a_plain_transformers_model(run_dir, tiny_model, workdir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = workdir / "merged"
    result = invoke("merge", "--adapter", run_dir, "--out", out)
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "money", 1: "music", 2: "pets"}
    assert merged.config.label2id == {"money": 0, "music": 1, "pets": 2}
    assert not any("lora" in k or "copies" in k or "original_module" in k for k in merged.state_dict())

    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(["the cat plays piano", "interest on savings"], padding=True, return_tensors="pt")
    adapted = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3,
                                                                 ignore_mismatched_sizes=True).eval()
    base_logits = adapted(**inputs).logits.detach()
    peftkit.load(adapted, run_dir / "adapter")
    adapted.eval()  # the new LoRA units (with dropout) start in training mode
    with torch.no_grad():
        want = adapted(**inputs).logits
        got = merged(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter changed the outputs


def test_info_describes_the_adapter(run_dir):
    result = invoke("info", run_dir)
    assert result.exit_code == 0, result.output
    facts = dict(line.split(":", 1) for line in result.stdout.splitlines())
    facts = {k: v.strip() for k, v in facts.items()}
    assert facts["method"] == "LORA" and facts["task type"] == "SEQ_CLS"
    assert facts["targets"].startswith("query, value (4 modules)")
    assert facts["r"] == "8" and facts["alpha"] == "16"
    size = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    assert f"{size:,} bytes" in facts["file size"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert facts["parameters"].startswith(f"{summary['trainable_params']:,} ")
    assert facts["labels"] == "money, music, pets"
    assert facts["trained for"] == "classify"
    assert facts["eval accuracy"].startswith(f"{summary['eval']['accuracy']:.4f} on 6 examples (step 7, last adapter")


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, fragments", [
    ("missing.csv", None, ["missing.csv: file not found"]),
    ("empty.csv", "", ["empty.csv: file is empty"]),
    ("cols.csv", "review,stars\ngood,5\n", ["cols.csv line 1: no 'text' (or 'sentence') column",
                                            "found columns 'review', 'stars'", "expected"]),
    ("short.csv", "text,label\na b,x\nc d,y\ne f\n", ["short.csv line 4: missing 'label' column"]),
    ("blank.csv", "text,label\na b,x\nc d,\n", ["blank.csv line 3: label '' is empty"]),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n', ["bad.jsonl line 2: invalid JSON"]),
    ("one.csv", "text,label\na,x\nb,x\nc,x\n", ["one.csv: found 1 distinct label"]),
])
def test_bad_data_gives_one_clear_line(tmp_path, name, content, fragments):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = invoke("train", "--data", path, "--out", tmp_path / "run")
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "run").exists()  # nothing is created before the inputs are checked


def test_eval_label_unknown_to_training(tmp_path, run_dir):
    path = tmp_path / "e.csv"
    path.write_text("text,label\nsome words,pets\nother words,sports\n")
    assert_clean_error(invoke("eval", "--adapter", run_dir, "--data", path),
                       "e.csv line 3: label 'sports' was not in the training data")


def test_adapter_errors_name_key_and_shapes(tmp_path, run_dir, tiny_model):
    from transformers import BertConfig, BertForSequenceClassification

    wider = tmp_path / "wider"
    cfg = BertConfig.from_pretrained(tiny_model)
    cfg.hidden_size, cfg.intermediate_size = 48, 96
    BertForSequenceClassification(cfg).save_pretrained(wider)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (wider / f).write_bytes((Path(tiny_model) / f).read_bytes())
    result = invoke("eval", "--model", wider, "--adapter", run_dir)
    assert_clean_error(result, "has shape", "in the file but", "in the model")
    assert_clean_error(invoke("info", tmp_path), f"{tmp_path}: no adapter_config.json")


def test_bad_usage_and_values(tmp_path, tiny_model):
    result = invoke("train", "--epochs", "many")
    assert result.exit_code == 2 and "'many' is not a valid integer" in result.output
    assert_clean_error(invoke("train", "--r", 0), "--r: expected a positive integer, found 0")
    assert_clean_error(invoke("train", "--model", tmp_path / "nowhere"), "not a directory")
    assert_clean_error(invoke("train", "--model", tiny_model, "--targets", "nothing_here", "--max-steps", 1,
                              "--out", tmp_path / "r"), "matched no module")


def test_debug_shows_the_original_exception(tmp_path):
    result = invoke("train", "--data", tmp_path / "missing.csv", "--debug")
    assert isinstance(result.exception, peftkit.DataError)


def test_python_dash_m_and_a_real_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "peftkit", "train", "--data", str(tmp_path / "nope.csv")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"Error: {tmp_path / 'nope.csv'}: file not found"
    assert proc.stdout.startswith("output: runs/lora-")


# The clients of the library: the trainer, the CLI, and the tools built on the trainer.
CLIENT_PACKAGES = ("train", "compare", "plan")
CLIENT_MODULES = ("cli", "__main__", "forgetting", "plan_cli")


def test_library_core_does_not_import_train_or_cli():
    """The trainer, the CLI and the tools on top of them (forgetting, compare, plan) are clients
    of the library: no core module imports them."""
    import ast

    root = Path(peftkit.__file__).parent
    core = [p for p in root.rglob("*.py")
            if p.relative_to(root).parts[0] not in CLIENT_PACKAGES and p.stem not in CLIENT_MODULES]
    assert len(core) >= 8
    for path in core:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                assert not any(part in CLIENT_PACKAGES + CLIENT_MODULES for part in parts), f"{path}: imports {name}"


def test_bundled_model_and_demo_data_smoke(tmp_path):
    """The no-argument path (bundled MiniLM, demo data), cut to two steps."""
    result = invoke("train", "--max-steps", 2, "--out", tmp_path / "demo", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["model"] == "minilm" and summary["labels"] == ["food", "sports", "tech"]
    assert summary["eval"]["n"] == 90 and summary["train_examples"] == 285
    args = json.loads((tmp_path / "demo" / "adapter" / "train_args.json").read_text())
    assert args["model"] == "minilm" and args["data"] is None


@pytest.mark.parametrize("method,peft_type,mergeable", [("ia3", "IA3", True), ("adapter", "BOTTLENECK", False)])
def test_weight_methods(workdir, tiny_model, data_files, method, peft_type, mergeable):
    from peftkit.train.options import METHOD_DEFAULTS

    out = workdir / method
    result = invoke("train", "--method", method, "--model", tiny_model, "--data", data_files[0],
                    "--eval-data", data_files[1], "--max-steps", 2, "--batch-size", 4, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["options"]["lr"] == METHOD_DEFAULTS[method]["lr"]
    got = json.loads(invoke("eval", "--adapter", out, "-q").stdout)
    assert got["accuracy"] == summary["eval"]["accuracy"]
    merged = invoke("merge", "--adapter", out, "--out", workdir / f"{method}-merged")
    if mergeable:
        assert merged.exit_code == 0, merged.output
    else:
        assert_clean_error(merged, "cannot be merged")


def test_qlora_trains_over_a_4bit_base_and_merges_to_a_dense_model(workdir, tiny_model, data_files):
    from transformers import AutoModelForSequenceClassification

    out = workdir / "qlora"
    result = invoke("train", "--method", "qlora", "--model", tiny_model, "--data", data_files[0],
                    "--eval-data", data_files[1], "--max-steps", 2, "--batch-size", 4, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "qlora" and summary["base_bytes"]["quantized_bytes"] > 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    got = json.loads(invoke("eval", "--adapter", out, "-q").stdout)  # evaluated over the 4-bit base again
    assert got["accuracy"] == summary["eval"]["accuracy"]
    assert got["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)
    merged_dir = workdir / "qlora-merged"
    assert invoke("merge", "--adapter", out, "--out", merged_dir).exit_code == 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    assert all(type(p).__name__ == "Parameter" for p in plain.parameters())  # dense, loadable without peftkit
    ids = torch.tensor([[2, 5, 7, 3]])
    adapted = peftkit.load(peftkit.quantize(AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=plain.config.num_labels, ignore_mismatched_sizes=True)), out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)
    bad = invoke("train", "--quantize", "int3", "--model", tiny_model, "--data", data_files[0],
                 "--out", workdir / "never")
    assert bad.exit_code != 0 and "int3" in bad.output and "Traceback" not in bad.output


def test_every_method_of_the_registry_is_in_the_help_and_the_docs():
    """The CLI's methods come from the registry; the README and docs/cli.md must name each, with
    its own learning rate."""
    import re
    from pathlib import Path

    from peftkit.registry import cli_methods

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    docs = (root / "docs" / "cli.md").read_text(encoding="utf-8")
    help_text = invoke("train", "--help").output
    method_row = next(line for line in docs.splitlines() if line.startswith("| `--method M`"))
    lr_row = next(line for line in docs.splitlines() if line.startswith("| `--lr X`"))
    readme_row = next(line for line in readme.splitlines() if line.startswith("| `--method`"))
    for name, (_, entry) in cli_methods().items():
        assert name in help_text
        assert f"`{name}`" in method_row and f"`{name}`" in readme_row, name
        if "lr" in entry.defaults:
            assert re.search(rf"`{re.escape(name)}` {entry.defaults['lr']:g}\b", lr_row), (name, lr_row)

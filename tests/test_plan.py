"""`peftkit plan`: the command, the exact counts of its fake-tensor model, and the drift of its
prediction against a measurement in a fresh process (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import peftkit
from peftkit import ConfigError
from peftkit.cli import cli
from peftkit.plan import Case, parse_bytes, predict_many

BERT = {"model_type": "bert", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 256}
LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
# Large enough that the activations (tens of MB) are not lost in the noise of a process's RSS.
BERT_DRIFT = {**BERT, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4}
LLAMA_DRIFT = {**LLAMA, "vocab_size": 8000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4}


def config_file(tmp_path, values: dict, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(values))
    return str(path)


def run(args: list[str]):
    return CliRunner().invoke(cli, ["plan", *args])


def test_budget_units():
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("800MB") == 800 * 10**6
    assert parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert parse_bytes("12345") == 12345
    for bad in ("24XB", "GB", "-3GB", "0"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_bytes(bad)


def test_table_and_json(tmp_path):
    model = config_file(tmp_path, BERT, "bert")
    result = run(["--model", model, "--method", "lora", "--batch-size", "4", "--max-length", "32"])
    assert result.exit_code == 0, result.output
    for label in ("weights", "adapter weights", "gradients", "optimizer state", "activations", "peak",
                  "trainable params:", "adapter file:", "validated within 20%"):
        assert label in result.output
    result = run(["--model", model, "--method", "ia3", "--batch-size", "4", "--max-length", "32", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    parts = ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes")
    assert sum(out[k] for k in parts) == out["peak_bytes"]
    assert out["activations_bytes"] > 0 and out["optimizer_bytes"] > 0 and out["trainable_params"] > 0
    assert out["validated"] is False and any("--method ia3 was not measured" in n for n in out["notes"])


def test_budget_lists_what_fits_and_states_its_rule(tmp_path):
    model = config_file(tmp_path, BERT, "bert")
    result = run(["--model", model, "--batch-size", "1", "--max-length", "16", "--budget", "8GiB",
                  "--search", "prompt,full"])
    assert result.exit_code == 0, result.output
    assert "this configuration fits" in result.output
    assert "rule: the configuration with the most trainable parameters" in result.output
    listed = [line.split() for line in result.output.splitlines() if line.startswith(("  prompt ", "  full "))]
    assert sorted(row[0] for row in listed) == ["full", "full", "prompt", "prompt"]  # checkpointing off and on
    # full fine-tuning trains the most parameters, and 8 GiB holds a 2-layer BERT easily
    assert "recommendation: --method full --batch-size 1 (peak" in result.output


@pytest.mark.parametrize("args, message", [
    (["--budget", "24XB"], "--budget '24XB'"),
    (["--budget", "1GB", "--search", "lora,nope"], "--search"),
    (["--method", "prefix", "--gradient-checkpointing"], "--gradient-checkpointing"),
    (["--method", "full", "--quantize", "nf4"], "--method full"),
    (["--method", "prompt", "--r", "8"], "--r does not apply to --method prompt"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-length", "100000"], "positions"),
    (["--model", "/nonexistent/model"], "--model"),
])
def test_bad_input(tmp_path, args, message):
    result = run(["--model", config_file(tmp_path, BERT, "bert"), *args])
    assert result.exit_code == 1, result.output
    assert message in result.output


def _real(config: dict, task: str, method: str, quantize: bool = False) -> torch.nn.Module:
    from peftkit.plan import build_model, peft_config, prepare, train_options

    case = Case(model="unused", method=method, task=task)
    options = train_options(case)
    model = build_model(load_config_from(config), task, 2)
    if quantize:
        peftkit.quantize(model, quant_type="nf4")
    prepare(model, options, peft_config(options, task))
    return model


def load_config_from(values: dict):
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


COUNTED = [(BERT, "classify", "lora"), (BERT, "classify", "prompt"), (BERT, "classify", "full"),
           (BERT, "classify", "ia3"), (LLAMA, "causal-lm", "lora"), (LLAMA, "causal-lm", "prefix")]
DRIFT = [(BERT_DRIFT, "lora", 16, 128, False), (LLAMA_DRIFT, "lora", 8, 256, True), (LLAMA_DRIFT, "full", 4, 128, False)]


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Every prediction the tests below compare, made in one process (``predict_many``)."""
    tmp = tmp_path_factory.mktemp("plan")
    cases = [Case(model=config_file(tmp, v, f"c{i}"), method=m, batch_size=2, max_length=8)
             for i, (v, _, m) in enumerate(COUNTED)]
    cases.append(Case(model=config_file(tmp, LLAMA, "q"), method="qlora", batch_size=2, max_length=8))
    cases += [Case(model=config_file(tmp, v, f"d{i}"), method=m, batch_size=b, max_length=t, gradient_checkpointing=g)
              for i, (v, m, b, t, g) in enumerate(DRIFT)]
    return dict(zip(range(len(cases)), predict_many(cases)))


@pytest.mark.parametrize("index", range(len(COUNTED)), ids=[f"{v['model_type']}-{m}" for v, _, m in COUNTED])
def test_counts_equal_a_real_model(plans, index):
    values, task, method = COUNTED[index]
    plan = plans[index]
    assert plan.task == task
    torch.manual_seed(0)
    model = _real(values, task, method)
    summary = peftkit.trainable_summary(model)
    assert (plan.trainable_params, plan.total_params) == (summary.trainable, summary.total)
    if method == "full":
        assert plan.adapter_file_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        tensors = peftkit.io.adapter_tensors(model, "default")
        assert plan.adapter_file_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_four_bit_weights_equal_a_quantized_model(plans):
    from peftkit import quant

    plan = plans[len(COUNTED)]
    model = _real(LLAMA, "causal-lm", "qlora", quantize=True)
    held = quant.weight_bytes(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert plan.weights_bytes == held["quantized_bytes"] + held["dense_bytes"] + buffers


@pytest.mark.parametrize("index", range(len(DRIFT)), ids=[f"{v['model_type']}-{m}-{'gc' if g else 'nogc'}"
                                                          for v, m, _, _, g in DRIFT])
def test_prediction_within_20_percent_of_a_measurement(plans, index):
    from peftkit.plan.measure import measure

    plan = plans[len(COUNTED) + 1 + index]
    predicted = plan.peak_bytes - plan.weights_bytes
    measured = measure(plan.case)["measured_bytes"]
    assert plan.activations_bytes > 20 * 2**20  # the case is not noise
    assert 0.8 <= predicted / measured <= 1.2, (predicted, measured)

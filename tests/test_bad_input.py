"""Bad input of every kind gives one line that names the problem: ``Error: ...`` and a non-zero
exit on the command line, a specific ``PeftkitError`` subclass in the API.

Cases already shown elsewhere are listed in docs/errors.md with their tests; this file holds
the rest, and checks that every test docs/errors.md names exists.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest
import torch

import peftkit
from cli_helpers import assert_clean_error, invoke, save_tiny_bert, write_topic_files
from conftest import tiny_bert
from peftkit import AdapterFileError, ConfigError, DataError, ModelError
from peftkit.registry import config_from_dict
from peftkit.train.data import read_examples
from peftkit.train.engine import read_run_options
from peftkit.train.lm_data import read_lm_examples
from peftkit.train.models import check_model_dir, resolve_model
from peftkit.train.options import (METHOD_OPTIONS, METHOD_SPECIFIC, METHODS, TrainOptions, build_options,
                                   read_yaml)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


@pytest.fixture(scope="module")
def tiny_model(workdir) -> str:
    return save_tiny_bert(workdir / "tiny-bert")


@pytest.fixture(scope="module")
def data_files(workdir) -> tuple[str, str]:
    return write_topic_files(workdir)


@pytest.fixture(scope="module")
def tiny_distilbert(workdir, tiny_model) -> str:
    """A model type with no bottleneck insertion map and no (IA)³ defaults, MiniLM's tokenizer."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64)
    path = workdir / "tiny-distilbert"
    DistilBertForSequenceClassification(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((Path(tiny_model) / name).read_bytes())
    return str(path)


def train(*args, out: Path | None = None):
    return invoke("train", *args, *(["--out", out] if out is not None else []))


# -- data ---------------------------------------------------------------------------------


def test_tsv_without_text_or_label_column_names_the_columns(tmp_path, tiny_model):
    path = tmp_path / "d.tsv"
    path.write_text("review\tstars\ngood\t5\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.tsv line 1: no 'text' \(or 'sentence'\) column; found columns "
                                        r"'review', 'stars'"):
        read_examples(path)
    path.write_text("text\tstars\ngood\t5\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.tsv line 1: no 'label' column; found columns 'text', 'stars'"):
        read_examples(path)
    assert_clean_error(train("--model", tiny_model, "--data", path, out=tmp_path / "run"),
                       "d.tsv line 1: no 'label' column", "found columns 'text', 'stars'")


@pytest.mark.parametrize("line, message", [
    ('{"text": " \\t ", "label": "b"}', "text is empty"),
    ('{"text": "x", "text_pair": "  ", "label": "b"}', "the second text (text_pair) is empty"),
])
def test_whitespace_only_text_in_jsonl_names_file_and_line(tmp_path, line, message):
    first = '{"text": "a", "text_pair": "b", "label": "a"}' if "text_pair" in line else '{"text": "a", "label": "a"}'
    path = tmp_path / "d.jsonl"
    path.write_text(first + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"d\.jsonl line 2: {re.escape(message)}"):
        read_examples(path)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "  ", "response": "yes"}, "'prompt' is empty"),
    ({"prompt": "hi", "response": " \n"}, "'response' is empty"),
    ({"text": "\t"}, "'text' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "message 2: the 'assistant' message's 'content' is empty"),
])
def test_causal_lm_empty_fields_name_file_and_line(tmp_path, record, message):
    path = tmp_path / "lm.jsonl"
    path.write_text('{"text": "fine"}\n' + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"lm\.jsonl line 2: {re.escape(message)}"):
        read_lm_examples(path)


def test_causal_lm_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"lm\.jsonl line 2: not UTF-8 text \(byte 0xe9\)"):
        read_lm_examples(path)


def test_cli_non_utf8_data_is_one_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\ncafe,a\ncaf\xe9,b\n")
    assert_clean_error(train("--data", path, out=tmp_path / "run"), "latin.csv line 3: not UTF-8 text (byte 0xe9)")


def test_cli_causal_lm_line_without_a_form(tmp_path, tiny_model):
    path = tmp_path / "lm.jsonl"
    path.write_text('{"text": "the cat sat"}\n{"question": "why", "answer": "because"}\n', encoding="utf-8")
    assert_clean_error(train("--model", tiny_model, "--data", path, out=tmp_path / "run"),
                       "lm.jsonl line 2: expected 'prompt' and 'response', 'messages', or 'text'",
                       "found fields 'question', 'answer'")
    first = tmp_path / "first.jsonl"
    first.write_text('{"question": "why", "answer": "because"}\n', encoding="utf-8")
    assert_clean_error(train("--model", tiny_model, "--data", first, out=tmp_path / "run"),
                       "first.jsonl: cannot tell the task", "fields 'question', 'answer'")


def test_cli_eval_data_label_unseen_in_training(tmp_path, data_files):
    path = tmp_path / "e.csv"
    path.write_text("text,label\nsome words,pets\nother words,sports\n", encoding="utf-8")
    assert_clean_error(train("--data", data_files[0], "--eval-data", path, out=tmp_path / "run"),
                       "e.csv line 3: label 'sports' was not in the training data", "known labels:")


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


@pytest.mark.parametrize("case", ["no class folders", "class without images", "corrupt image"])
def test_cli_image_folder_errors_are_one_line(tmp_path, case):
    root = tmp_path / "images"
    root.mkdir()
    if case == "no class folders":
        (root / "notes.txt").write_text("x")
        fragments = [str(root), "no class folders"]
    elif case == "class without images":
        _png(root / "red" / "0.png")
        (root / "blue").mkdir()
        (root / "blue" / "readme.txt").write_text("x")
        fragments = [str(root / "blue"), "class 'blue' has no images", "1 other file ignored"]
    else:
        _png(root / "red" / "0.png")
        _png(root / "blue" / "0.png")
        (root / "blue" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
        fragments = [str(root / "blue" / "1.png"), "not a readable image"]
    assert_clean_error(train("--data", root, out=tmp_path / "run"), *fragments)


# -- options and YAML ---------------------------------------------------------------------


@pytest.mark.parametrize("key, near", [
    ("learning_rate", "did you mean 'lr'?"),
    ("epochz", "did you mean 'epochs'?"),
    ("batch-sise", "did you mean 'batch-size'?"),
    ("lora_r", "did you mean 'r' or 'lora_fa'?"),
    ("num_virtual_tokens", "did you mean 'virtual_tokens'?"),
])
def test_unknown_yaml_key_lists_near_names_only(tmp_path, key, near):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    message = str(info.value)
    assert message == f"{path}: unknown key {key!r}; {near}"
    assert "known keys" not in message and "tensorboard" not in message  # not the whole list


def test_unknown_yaml_key_without_near_names_lists_the_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("zzz: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'; no option has a similar name \(known keys: model, "):
        read_yaml(path)


def test_cli_unknown_yaml_key_suggests_the_option(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.1\n", encoding="utf-8")
    assert_clean_error(train("--config", path), str(path), "unknown key 'learning_rate'", "did you mean 'lr'?")


@pytest.mark.parametrize("flag, value, message", [
    ("--r", 0, "--r: expected a positive integer, found 0"),
    ("--r", -2, "--r: expected a positive integer, found -2"),
    ("--alpha", 0, "--alpha: expected a positive number, found 0.0"),
    ("--dropout", 1, "--dropout: expected a number in [0, 1), found 1.0"),
    ("--dropout", -0.1, "--dropout: expected a number in [0, 1), found -0.1"),
    ("--virtual-tokens", 0, "--virtual-tokens: expected a positive integer, found 0"),
    ("--lr", 0, "--lr: expected a positive number, found 0.0"),
    ("--lr", -1e-3, "--lr: expected a positive number, found -0.001"),
    ("--batch-size", 0, "--batch-size: expected a positive integer, found 0"),
    ("--epochs", 0, "--epochs: expected a positive integer, found 0"),
    ("--warmup-ratio", 1, "--warmup-ratio: expected a number in [0, 1), found 1.0"),
])
def test_cli_out_of_range_values(tmp_path, flag, value, message):
    method = ["--method", "prompt"] if flag == "--virtual-tokens" else []
    assert_clean_error(train(*method, flag, value, out=tmp_path / "run"), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    ("r: 0\n", "c.yaml: --r: expected a positive integer, found 0"),
    ("batch_size: 0\n", "c.yaml: --batch-size: expected a positive integer, found 0"),
    ("r: eight\n", "c.yaml: key 'r': expected an integer, found 'eight'"),
    ("lr: fast\n", "c.yaml: key 'lr': expected a number, found 'fast'"),
    ("bf16: maybe\n", "c.yaml: key 'bf16': expected true or false, found 'maybe'"),
    ("targets: {query: 1}\n", "c.yaml: key 'targets': expected a comma-separated string"),
    ("r: 4\nalpha: [16\n", "c.yaml line 3: invalid YAML"),
    ("r: 4\n  alpha: 3\n", "c.yaml line 2: invalid YAML"),
])
def test_cli_yaml_types_ranges_and_syntax(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_text(content, encoding="utf-8")
    assert_clean_error(train("--config", path, out=tmp_path / "run"), message)


@pytest.mark.parametrize("method, flag, value", [
    ("prompt", "--r", 8), ("ptuning", "--alpha", 16), ("prefix", "--r", 4), ("ia3", "--r", 8),
    ("adapter", "--alpha", 16), ("prompt", "--dropout", 0.05), ("ia3", "--dropout", 0.1),
    ("lora", "--virtual-tokens", 20), ("dora", "--virtual-tokens", 5), ("adapter", "--targets", "query"),
    ("prompt", "--targets", "query"),
])
def test_cli_option_that_does_not_apply_to_the_method(tmp_path, method, flag, value):
    # The values are the defaults: a flag given explicitly counts, whatever its value.
    assert_clean_error(train("--method", method, flag, value, out=tmp_path / "run"),
                       f"{flag} does not apply to --method {method}", "drop it")
    assert not (tmp_path / "run").exists()


def test_yaml_key_that_does_not_apply_to_the_method(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: prompt\nvirtual_tokens: 8\nr: 8\n", encoding="utf-8")
    assert_clean_error(train("--config", path), f"{path}: key 'r' (--r) does not apply to --method prompt",
                       "virtual-tokens")
    path.write_text("method: ia3\n", encoding="utf-8")  # the method from the file, the option from a flag
    assert_clean_error(train("--config", path, "--dropout", 0.1),
                       f"--dropout does not apply to --method ia3 (from {path})")
    path.write_text("dropout: 0.1\n", encoding="utf-8")  # the option from the file, the method from a flag
    assert_clean_error(train("--config", path, "--method", "prefix"), f"{path}: key 'dropout'", "--method prefix")


def test_method_options_table_drives_the_check():
    assert set(METHOD_OPTIONS) == set(METHODS)
    for method, takes in METHOD_OPTIONS.items():
        for name in METHOD_SPECIFIC:
            given = {name: {"dropout": 0.0, "targets": "query"}.get(name, 1)}
            if name in takes:
                build_options({}, {"method": method, **given})
            else:
                flag = "--" + name.replace("_", "-")
                with pytest.raises(ConfigError, match=f"{flag} does not apply to --method {method}"):
                    build_options({}, {"method": method, **given})


def test_saved_options_are_not_taken_for_given_ones(tmp_path):
    """options.json (--resume) and launch.yaml (torchrun's processes) hold every field, defaults
    of other methods' options included: they are not what the user gave."""
    import yaml

    for method in METHOD_OPTIONS:
        saved = TrainOptions(method=method).to_dict()
        run = tmp_path / method
        run.mkdir()
        (run / "options.json").write_text(json.dumps(saved), encoding="utf-8")
        assert read_run_options(str(run)).method == method
        (run / "launch.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
        assert build_options(read_yaml(run / "launch.yaml"), {"quiet": True}, source=str(run / "launch.yaml")).method \
            == method
    with pytest.raises(ConfigError, match="--r does not apply to --method prompt"):
        build_options(TrainOptions(method="prompt").to_dict(), {"r": 8}, source="options.json")
    with pytest.raises(ConfigError, match="key 'r' .* does not apply"):
        build_options({"method": "prompt", "r": 8}, {}, source="c.yaml", saved=False)


def test_cli_resume_takes_no_method_option(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "options.json").write_text(json.dumps(TrainOptions(method="prompt").to_dict()), encoding="utf-8")
    result = invoke("train", "--resume", run, "--r", 4)
    assert result.exit_code != 0 and "drop --r" in result.output


# -- adapter config files -----------------------------------------------------------------


def test_unknown_empty_field_is_a_warning_naming_file_and_key(tmp_path):
    directory = tmp_path / "a"
    directory.mkdir()
    data = {**peftkit.LoraConfig(r=4, target_modules=["query"]).to_dict(), "some_future_field": None,
            "another_future_field": []}
    (directory / "adapter_config.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        assert peftkit.read_config(directory).r == 4
    messages = [str(w.message) for w in caught]
    for key in ("some_future_field", "another_future_field"):
        assert any(str(directory / "adapter_config.json") in m and repr(key) in m for m in messages), messages
    assert all(issubclass(w.category, peftkit.PeftkitWarning) for w in caught)
    # the CLI prints each as one line (an adapter needs weights for info: any safetensors file)
    from safetensors.torch import save_file

    save_file({"base_model.model.x.lora_A.weight": torch.zeros(4, 2)}, str(directory / "adapter_model.safetensors"))
    result = invoke("info", directory)
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "future_field" in line]
    assert len(warned) == 2 and all(line.startswith("Warning: ") for line in warned), result.stderr
    data["some_future_field"] = {"enabled": True}
    (directory / "adapter_config.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: unknown field 'some_future_field'"):
        peftkit.read_config(directory)


@pytest.mark.parametrize("data, field, expected, found", [
    ({"peft_type": "LORA", "lora_dropout": math.nan}, "lora_dropout", "finite number", "nan"),
    ({"peft_type": "LORA", "lora_alpha": math.inf}, "lora_alpha", "finite number", "inf"),
    ({"peft_type": "LORA", "use_rslora": "false"}, "use_rslora", "true or false", "'false'"),
    ({"peft_type": "LORA", "use_dora": 1}, "use_dora", "true or false", "1"),
    ({"peft_type": "LORA", "init_lora_weights": 1.0}, "init_lora_weights", "True, False or 'gaussian'", "1.0"),
    ({"peft_type": "LORA", "inference_mode": "yes"}, "inference_mode", "true or false", "'yes'"),
    ({"peft_type": "LORA", "base_model_name_or_path": 3}, "base_model_name_or_path", "a string", "3"),
    ({"peft_type": "LORA", "target_modules": "(query"}, "target_modules", "valid regular expression", "'(query'"),
    ({"peft_type": "LORA", "target_modules": ["query"], "exclude_modules": "[x"}, "exclude_modules",
     "valid regular expression", "'[x'"),
    ({"peft_type": "LORA", "rank_pattern": {"(": 2}}, "rank_pattern", "valid regular expression", "'('"),
    ({"peft_type": "LORA", "rank_pattern": {"query": "2"}}, "rank_pattern", "positive integer", "'2'"),
    ({"peft_type": "LORA", "layers_pattern": "layer)"}, "layers_pattern", "valid regular expression", "'layer)'"),
    ({"peft_type": "LORA", "layers_to_transform": [True]}, "layers_to_transform", "layer index", "[True]"),
    ({"peft_type": "IA3", "layers_to_transform": ["0"]}, "layers_to_transform", "layer index", "['0']"),
    ({"peft_type": "IA3", "fan_in_fan_out": "no"}, "fan_in_fan_out", "true or false", "'no'"),
    ({"peft_type": "BOTTLENECK", "non_linearity": ["relu"]}, "non_linearity", "one of", "['relu']"),
    ({"peft_type": "BOTTLENECK", "dropout": 1.0}, "dropout", "[0.0, 1.0)", "1.0"),
    ({"peft_type": "BOTTLENECK", "insertion": {"layers": 1, "attn_out": "a", "ffn_out": "f.o", "ffn": "f"}},
     "insertion['layers']", "module name", "1"),
    ({"peft_type": "BOTTLENECK", "insertion": {"layers": "l", "attn_out": "a", "ffn_out": "f.o", "ffn": "f",
                                               "ffn_residual_arg": "1"}}, "insertion['ffn_residual_arg']",
     "positive argument index", "'1'"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 0}, "num_virtual_tokens", "positive integer", "0"),
    ({"peft_type": "P_TUNING", "num_virtual_tokens": -1}, "num_virtual_tokens", "positive integer", "-1"),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2.5}, "num_virtual_tokens", "positive integer", "2.5"),
    ({"peft_type": "P_TUNING", "encoder_dropout": 1}, "encoder_dropout", "[0.0, 1.0)", "1"),
    ({"peft_type": "PROMPT_TUNING", "tokenizer_name_or_path": ["gpt2"]}, "tokenizer_name_or_path", "a string",
     "['gpt2']"),
])
def test_adapter_config_types_and_ranges_name_field_expected_and_found(data, field, expected, found):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source="adapter_config.json")
    message = str(info.value)
    assert message.startswith(f"adapter_config.json: {field}"), message
    assert ("expected" in message or "supports" in message) and expected in message, message
    assert f"found {found}" in message, message


def test_bad_regex_set_after_the_config_is_built_is_a_config_error():
    model = tiny_bert()
    config = peftkit.LoraConfig(target_modules=["query"])
    config.target_modules = "(query"
    with pytest.raises(ConfigError, match=r"target_modules: expected a valid regular expression, found '\(query'"):
        peftkit.apply(model, config)
    assert not peftkit.state.has_adapters(model)


@pytest.mark.parametrize("raw, message", [
    (b'{"peft_type": "LORA", "r": 4, "target_modules": ["caf\xe9"]}', "line 1: not UTF-8 text (byte 0xe9)"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'["LORA"]', "expected a JSON object, found list"),
])
def test_unreadable_adapter_config_is_an_adapter_file_error(tmp_path, raw, message):
    (tmp_path / "adapter_config.json").write_bytes(raw)
    with pytest.raises(AdapterFileError) as info:
        peftkit.read_config(tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(info.value) and message in str(info.value)


def test_pickle_that_is_not_a_tensor_mapping_is_refused(tmp_path):
    model = tiny_bert()
    peftkit.apply(model, peftkit.LoraConfig(r=2, target_modules=["query"]))
    peftkit.save(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save([torch.zeros(2)], tmp_path / "adapter_model.bin")
    fresh = tiny_bert()
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin: holds something other than tensors .*found list"):
        peftkit.load(fresh, tmp_path, allow_pickle=True)
    assert not peftkit.state.has_adapters(fresh)


# -- targets ------------------------------------------------------------------------------


def test_cli_targets_that_match_nothing_list_near_names(tmp_path, tiny_model, data_files):
    assert_clean_error(train("--model", tiny_model, "--data", data_files[0], "--targets", "quary,valeu",
                             "--max-steps", 1, out=tmp_path / "r1"),
                       "target_modules ['quary', 'valeu'] matched no module", "near names: query, value")
    assert_clean_error(train("--model", tiny_model, "--data", data_files[0], "--targets", "nosuch",
                             "--max-steps", 1, out=tmp_path / "r2"),
                       "target_modules ['nosuch'] matched no module", "linear layers include: bert.encoder")


@pytest.mark.parametrize("config, method", [
    (peftkit.LoraConfig(target_modules=["0"]), "LoRA"),
    (peftkit.LoraConfig(target_modules=["0"], use_dora=True), "LoRA"),
    (peftkit.IA3Config(target_modules=["attention"]), "(IA)³"),
])
def test_target_that_is_a_block_not_a_layer(config, method):
    model = tiny_bert()
    modules = [name for name, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=rf"{re.escape(method)} cannot adapt 'bert\.encoder\.layer\.0(\.attention)?' "
                                          r"of type Bert(Layer|Attention); supported: Linear, Conv1D"):
        peftkit.apply(model, config)
    assert [name for name, _ in model.named_modules()] == modules


# -- models -------------------------------------------------------------------------------


def _model_dir(root: Path, config: dict | str | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(config if isinstance(config, str) else json.dumps(config), encoding="utf-8")
    return root


@pytest.mark.parametrize("config, message", [
    (None, "no config.json; not a transformers model directory"),
    ('{"model_type": "bert",', "config.json line 1: invalid JSON"),
    ('["bert"]', "config.json: expected a JSON object, found list"),
    ('{"hidden_size": 32}', "config.json: no 'model_type'; not a transformers model config"),
    ('{"model_type": "no-such-architecture"}', "model_type 'no-such-architecture' is not one transformers implements"),
])
def test_model_directory_that_is_not_a_transformers_model(tmp_path, data_files, config, message):
    path = _model_dir(tmp_path / "model", config)
    with pytest.raises(ModelError, match=re.escape(message)):
        resolve_model(str(path))
    assert_clean_error(train("--model", path, "--data", data_files[0], out=tmp_path / "run"), str(path), message)


def test_model_directory_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"--model '.*nowhere': not a directory \(nothing is there\); pass a local"):
        resolve_model(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_model_with_its_own_code_is_refused_and_never_run(tmp_path, tiny_model, data_files, file):
    """An auto_map to the directory's own code: peftkit never sets trust_remote_code, imports nothing."""
    path = tmp_path / "custom"
    path.mkdir()
    for f in Path(tiny_model).iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "ran.txt"
    code = f"open({str(marker)!r}, 'w').write('imported')\n"
    for module in ("configuration_custom.py", "modeling_custom.py", "tokenization_custom.py"):
        (path / module).write_text(code + "class Custom:\n    pass\n", encoding="utf-8")
    data = json.loads((path / file).read_text())
    data["auto_map"] = ({"AutoConfig": "configuration_custom.Custom",
                         "AutoModelForSequenceClassification": "modeling_custom.Custom"}
                        if file == "config.json" else {"AutoTokenizer": ["tokenization_custom.Custom", None]})
    (path / file).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelError, match="peftkit does not run a model's own code"):
        check_model_dir(str(path))
    result = train("--model", path, "--data", data_files[0], "--max-steps", 1, out=tmp_path / "run")
    assert_clean_error(result, str(path / file), "auto_map", "peftkit does not run a model's own code")
    assert not marker.exists()


def test_adapter_method_on_an_architecture_without_insertion_map(tmp_path, tiny_distilbert, data_files):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_distilbert)
    modules = [name for name, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=r"no insertion mapping for model type 'distilbert' \(supported model types: "
                                          r"bert, camembert, .*gpt2, .*llama"):
        peftkit.apply(model, peftkit.AdapterConfig())
    assert [name for name, _ in model.named_modules()] == modules
    assert_clean_error(train("--model", tiny_distilbert, "--data", data_files[0], "--method", "adapter",
                             "--max-steps", 1, out=tmp_path / "run"),
                       "model type 'distilbert'", "supported model types: bert")


def test_ia3_without_default_targets_names_the_model_types_it_has(tmp_path, tiny_distilbert, data_files):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_distilbert)
    with pytest.raises(ConfigError, match=r"no default for model type 'distilbert' \(defaults exist for model types: "
                                          r"bert, .*gpt2, .*llama, .*\); pass target_modules"):
        peftkit.apply(model, peftkit.IA3Config())
    assert_clean_error(train("--model", tiny_distilbert, "--data", data_files[0], "--method", "ia3",
                             "--max-steps", 1, out=tmp_path / "run"),
                       "model type 'distilbert'", "defaults exist for model types: bert")


# -- docs/errors.md names real tests ------------------------------------------------------


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def test_errors_doc_names_only_tests_that_exist():
    doc = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    named = re.findall(r"tests/([\w/]+\.py)::(test_\w+)", doc)
    assert len(named) >= 40, "docs/errors.md should name the test of every row"
    known: dict[str, set[str]] = {}
    missing = []
    for file, name in named:
        path = ROOT / "tests" / file
        if file not in known:
            known[file] = _test_names(path) if path.is_file() else set()
        if name not in known[file]:
            missing.append(f"tests/{file}::{name}")
    assert not missing, f"docs/errors.md names tests that do not exist: {missing}"
    rows = [line for line in doc.splitlines() if line.startswith("|") and not set(line) <= set("|- ")]
    for line in rows[1:]:
        if line.startswith("| input") or line.startswith("| Input"):
            continue
        assert "tests/" in line, f"a row of docs/errors.md without its test: {line}"

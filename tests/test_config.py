"""Configs and adapter files: validation, HF PEFT config files, JSON round trip, load errors.

Every error must name what is wrong (the field or the tensor key, the file) and what was
expected against what was found; a load that fails must leave the model exactly as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from conftest import model_inputs, output_of, tiny_bert, tiny_llama
from peftkit import AdapterFileError, ConfigError, ModelError, PeftkitError
from peftkit.registry import config_from_dict

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


pytestmark = pytest.mark.usefixtures("one_thread")


# -- LoraConfig validation -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field, hint, found", [
    ({"r": 0}, "r", "positive", "0"),
    ({"r": -4}, "r", "positive", "-4"),
    ({"r": "8"}, "r", "integer", "'8'"),
    ({"r": 8.0}, "r", "integer", "8.0"),
    ({"r": True}, "r", "integer", "True"),
    ({"lora_alpha": "16"}, "lora_alpha", "number", "'16'"),
    ({"lora_dropout": 1.5}, "lora_dropout", "1", "1.5"),
    ({"lora_dropout": -0.1}, "lora_dropout", "0", "-0.1"),
    ({"bias": "x"}, "bias", "lora_only", "'x'"),
    ({"init_lora_weights": "corda"}, "init_lora_weights", "gaussian", "'corda'"),  # pissa/olora: implemented
    ({"init_lora_weights": "pissa_niter_x"}, "init_lora_weights", "gaussian", "'pissa_niter_x'"),
    ({"target_modules": 3}, "target_modules", "list", "3"),
    ({"target_modules": ["query", 3]}, "target_modules", "list", "['query', 3]"),
    ({"modules_to_save": "classifier"}, "modules_to_save", "list", "'classifier'"),
    ({"layers_to_transform": [0, -1]}, "layers_to_transform", "index", "[0, -1]"),
    ({"rank_pattern": {"query": 0}}, "rank_pattern", "positive", "0"),
    ({"alpha_pattern": ["query"]}, "alpha_pattern", "mapping", "['query']"),
    ({"task_type": "CLS"}, "task_type", "SEQ_CLS", "'CLS'"),
])
def test_invalid_value_names_field_expected_and_found(kwargs, field, hint, found) -> None:
    with pytest.raises(ConfigError) as info:
        peftkit.LoraConfig(**kwargs)
    message = str(info.value)
    assert isinstance(info.value, PeftkitError) and isinstance(info.value, ValueError)
    assert re.match(rf"{field}\b", message), message  # the field comes first
    assert "expected" in message or "supports" in message, message
    assert hint in message, message  # what is expected
    assert message.rstrip().endswith(found), message  # what was found


def test_valid_config_normalizes_selectors() -> None:
    config = peftkit.LoraConfig(target_modules=("value", "query", "value"), layers_to_transform=1,
                                modules_to_save=["classifier", "classifier"])
    assert config.target_modules == ["query", "value"]
    assert config.layers_to_transform == [1]
    assert config.modules_to_save == ["classifier"]
    assert peftkit.LoraConfig(target_modules=r".*\.(query|value)").target_modules == r".*\.(query|value)"


# -- JSON round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {},
    dict(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["query", "value"], task_type="SEQ_CLS",
         exclude_modules=["layer.0.attention.self.value"], layers_to_transform=[0, 1], layers_pattern="layer",
         rank_pattern={"query": 2}, alpha_pattern={"value": 3.5}, modules_to_save=["pooler"], bias="lora_only",
         use_rslora=True, init_lora_weights="gaussian", fan_in_fan_out=True, base_model_name_or_path="x/y",
         revision="main", inference_mode=True),
    dict(target_modules=r".*\.q_proj", exclude_modules=r".*layers\.0\..*", init_lora_weights=False, bias="all"),
])
def test_json_round_trip(kwargs) -> None:
    config = peftkit.LoraConfig(**kwargs)
    data = config.to_dict()
    assert data["peft_type"] == "LORA"
    text = json.dumps(data)
    again = peftkit.LoraConfig.from_dict(json.loads(text))
    assert again == config
    assert config_from_dict(json.loads(text)) == config
    assert again.to_dict() == data


# -- HF PEFT config files ----------------------------------------------------------------------


def _hf_config_dir(tmp_path, **kwargs):
    peft = pytest.importorskip("peft")
    directory = tmp_path / "hf"
    peft.LoraConfig(**kwargs).save_pretrained(directory)
    return directory


def _edit(directory, **changes) -> None:
    path = directory / CONFIG
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def test_hf_config_file_with_default_unsupported_fields_is_read(tmp_path) -> None:
    directory = _hf_config_dir(tmp_path, r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                               task_type="SEQ_CLS", use_rslora=True, bias="lora_only", modules_to_save=["pooler"],
                               rank_pattern={"query": 2})
    data = json.loads((directory / CONFIG).read_text())
    own = {f.name for f in dataclasses.fields(peftkit.LoraConfig)}
    # The file really carries HF fields peftkit does not implement (at their defaults).
    assert {"use_qalora", "corda_config", "megatron_core", "alora_invocation_tokens"} <= set(data) - own

    config = peftkit.read_config(directory)
    assert isinstance(config, peftkit.LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16, 0.1)
    assert config.target_modules == ["query", "value"]
    assert (config.task_type, config.use_rslora, config.bias) == ("SEQ_CLS", True, "lora_only")
    assert config.modules_to_save == ["pooler"]
    assert config.rank_pattern == {"query": 2}


@pytest.mark.parametrize("field, value", [
    ("use_qalora", True),
    ("init_lora_weights", "corda"),  # pissa, olora, orthogonal, loftq: implemented (methods/lora_init.py)
    ("loftq_config", [4, 1]),  # implemented (with init_lora_weights="loftq"): not a mapping is refused
    ("eva_config", {"rho": 0.5}),  # implemented (peftkit.eva): a bad value is refused
    ("layer_replication", [[2, 1]]),  # implemented (peftkit.replication): a bad value is refused
    ("lora_bias", "yes"),  # implemented: a bad value is refused
    ("trainable_token_indices", [1, -2]),  # implemented (peftkit.tokens): a bad value is refused
    ("my_extra_field", 5),
    ("r", 0),
])
def test_hf_config_file_with_unsupported_value_is_refused(tmp_path, field, value) -> None:
    directory = _hf_config_dir(tmp_path, r=4, target_modules=["query"])
    _edit(directory, **{field: value})
    with pytest.raises(PeftkitError) as info:
        peftkit.read_config(directory)
    message = str(info.value)
    assert field in message, message
    assert str(directory / CONFIG) in message, message


def test_hf_config_file_unknown_empty_field_is_accepted(tmp_path) -> None:
    directory = _hf_config_dir(tmp_path, r=4, target_modules=["query"])
    _edit(directory, some_future_field=None, another_future_field={})
    assert peftkit.read_config(directory).r == 4


def test_config_file_with_other_peft_type_is_refused(tmp_path) -> None:
    directory = _hf_config_dir(tmp_path, r=4, target_modules=["query"])
    _edit(directory, peft_type="NOT_A_METHOD")
    with pytest.raises(PeftkitError, match="NOT_A_METHOD"):
        peftkit.read_config(directory)


# -- load errors leave the model as it was -----------------------------------------------------


def snapshot(model) -> dict:
    return {
        "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "out": output_of(model, model_inputs("bert")),
        "active": peftkit.active_adapters(model) if "_peftkit" in model.__dict__ else None,
    }


def assert_unchanged(model, before: dict) -> None:
    """Compare every aspect and report all that changed, not only the first."""
    after = snapshot(model)
    changed = []
    if after["modules"] != before["modules"]:
        changed.append("module tree or train/eval modes")
    if after["state"].keys() != before["state"].keys():
        changed.append(f"state_dict keys: {sorted(set(after['state']) ^ set(before['state']))[:4]}")
    else:
        changed += [f"value of {k}" for k, v in before["state"].items() if not torch.equal(after["state"][k], v)]
    if after["grad"] != before["grad"]:
        changed.append(f"requires_grad of {[n for n in before['grad'] if after['grad'].get(n) != before['grad'][n]][:4]}")
    if not torch.equal(after["out"], before["out"]):
        changed.append(f"outputs (by {(after['out'] - before['out']).abs().max().item():.3g})")
    if after["active"] != before["active"]:
        changed.append(f"active adapters {before['active']} -> {after['active']}")
    assert not changed, "the model changed: " + "; ".join(changed)


@pytest.fixture
def saved(tmp_path):
    """A good adapter on tiny BERT (query/value + the classifier copy) and a writable copy of it."""
    model = peftkit.apply(tiny_bert(), peftkit.LoraConfig(target_modules=["query", "value"], init_lora_weights=False))
    directory = tmp_path / "good"
    peftkit.save(model, directory)
    return directory


def _copy(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


QUERY0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


def _broken(kind: str, good, tmp_path):
    """A copy of ``good`` broken in one way; returns (directory, strings the error must contain)."""
    directory = tmp_path / kind
    if kind == "missing-dir":
        return directory, [str(directory)]
    _copy(good, directory)
    tensors = load_file(directory / WEIGHTS)
    if kind == "missing-config":
        os.remove(directory / CONFIG)
        return directory, [CONFIG]
    if kind == "missing-weights":
        os.remove(directory / WEIGHTS)
        return directory, [WEIGHTS]
    if kind == "invalid-json":
        (directory / CONFIG).write_text('{\n  "peft_type": "LORA",\n  "r": 8,,\n  "lora_alpha": 8\n}\n')
        return directory, ["line 3", CONFIG]
    if kind == "unsupported-field":
        _edit(directory, use_qalora=True)
        return directory, ["use_qalora", CONFIG]
    if kind == "corrupt-weights":
        (directory / WEIGHTS).write_bytes(b"\x00not a safetensors file")
        return directory, [WEIGHTS]
    if kind == "missing-key":
        key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
        del tensors[key]
        save_file(tensors, directory / WEIGHTS)
        return directory, [key]
    if kind == "unexpected-key":
        key = "base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight"
        tensors[key] = torch.zeros(8, 32)
        save_file(tensors, directory / WEIGHTS)
        return directory, [key]
    if kind == "wrong-shape":
        key = f"{QUERY0}.lora_A.weight"
        assert tuple(tensors[key].shape) == (8, 32)
        tensors[key] = torch.zeros(4, 32)
        save_file(tensors, directory / WEIGHTS)
        return directory, [key, "(4, 32)", "(8, 32)"]
    if kind == "wrong-head-shape":
        key = "base_model.model.classifier.weight"
        tensors[key] = torch.zeros(3, 32)
        save_file(tensors, directory / WEIGHTS)
        return directory, [key, "(3, 32)", "(2, 32)"]
    raise AssertionError(kind)


BROKEN = ["missing-dir", "missing-config", "missing-weights", "invalid-json", "unsupported-field",
          "corrupt-weights", "missing-key", "unexpected-key", "wrong-shape", "wrong-head-shape"]


@pytest.mark.parametrize("kind", BROKEN)
def test_load_error_names_the_problem_and_leaves_model_unchanged(kind, saved, tmp_path) -> None:
    directory, must_name = _broken(kind, saved, tmp_path)
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(AdapterFileError) as info:
        peftkit.load(model, directory)
    for text in must_name:
        assert text in str(info.value), str(info.value)
    assert_unchanged(model, before)
    with pytest.raises(ModelError):
        peftkit.active_adapters(model)  # no adapter state was left behind
    peftkit.load(model, saved)  # and the model still takes a good adapter


@pytest.mark.parametrize("kind", ["unsupported-field", "missing-key", "wrong-shape"])
def test_failed_load_keeps_the_existing_adapter(kind, saved, tmp_path) -> None:
    """A failed load next to a working adapter leaves that adapter loaded, active and as trainable as it was."""
    directory, _ = _broken(kind, saved, tmp_path)
    model = peftkit.apply(tiny_bert(), peftkit.LoraConfig(target_modules=["value"], init_lora_weights=False),
                          name="mine")
    with torch.no_grad():  # as if trained: the head copy moves too
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    with peftkit.disabled(model):
        plain = output_of(model, model_inputs("bert"))
    before = snapshot(model)
    assert before["active"] == ["mine"] and any(before["grad"].values())
    assert (before["out"] - plain).abs().max() > 1e-2  # the adapter matters to the output
    with pytest.raises(AdapterFileError):
        peftkit.load(model, directory, name="theirs")
    assert_unchanged(model, before)


# -- pickle files --------------------------------------------------------------------------------


def _to_pickle(directory) -> None:
    torch.save(load_file(directory / WEIGHTS), directory / "adapter_model.bin")
    os.remove(directory / WEIGHTS)


def test_pickle_file_needs_opt_in(saved, tmp_path) -> None:
    reference = peftkit.load(tiny_bert(), saved)
    directory = _copy(saved, tmp_path / "pickled")
    _to_pickle(directory)

    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="allow_pickle") as info:
        peftkit.load(model, directory)
    assert "adapter_model.bin" in str(info.value)
    assert_unchanged(model, before)

    peftkit.load(model, directory, allow_pickle=True)
    inputs = model_inputs("bert")
    assert torch.equal(output_of(model, inputs), output_of(reference, inputs))
    assert not torch.equal(output_of(model, inputs), before["out"])


class NotATensor:
    def __reduce__(self):
        return (print, ("code ran while reading an adapter",))


def test_pickle_with_code_is_refused_even_with_opt_in(saved, tmp_path, capsys) -> None:
    directory = _copy(saved, tmp_path / "evil")
    tensors = load_file(directory / WEIGHTS)
    torch.save({**tensors, "extra": NotATensor()}, directory / "adapter_model.bin")
    os.remove(directory / WEIGHTS)
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="adapter_model.bin"):
        peftkit.load(model, directory, allow_pickle=True)
    assert "code ran" not in capsys.readouterr().out
    assert_unchanged(model, before)


# -- targeting and naming errors -------------------------------------------------------------


def test_target_matching_nothing_lists_near_names() -> None:
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        peftkit.apply(model, peftkit.LoraConfig(target_modules=["qeury", "valeu"]))
    message = str(info.value)
    assert "qeury" in message and "query" in message and "value" in message, message
    assert_unchanged(model, before)
    with pytest.raises(ModelError):
        peftkit.active_adapters(model)


def test_target_outside_layers_to_transform_is_explained() -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError) as info:
        peftkit.apply(model, peftkit.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    assert "q_proj" in str(info.value) and "7" in str(info.value)


def test_modules_to_save_matching_nothing_is_refused() -> None:
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="modules_to_save.*not_a_module"):
        peftkit.apply(model, peftkit.LoraConfig(target_modules=["query"], modules_to_save=["not_a_module"]))
    assert_unchanged(model, before)


def test_adapter_name_that_exists_already(saved) -> None:
    model = peftkit.apply(tiny_bert(), peftkit.LoraConfig(target_modules=["key"], init_lora_weights=False))
    before = snapshot(model)
    with pytest.raises(ConfigError, match="'default'.*exists"):
        peftkit.apply(model, peftkit.LoraConfig(target_modules=["query"]))
    with pytest.raises(ConfigError, match="'default'.*exists"):
        peftkit.load(model, saved)
    assert_unchanged(model, before)
    peftkit.load(model, saved, name="other")
    assert peftkit.active_adapters(model) == ["other"]


@pytest.mark.parametrize("name", ["", "a.b", 3])
def test_invalid_adapter_name(name) -> None:
    with pytest.raises(ConfigError, match="adapter name"):
        peftkit.apply(tiny_bert(), peftkit.LoraConfig(target_modules=["query"]), name=name)


def test_set_active_unknown_name(saved) -> None:
    model = peftkit.load(tiny_bert(), saved, name="first")
    before = snapshot(model)
    with pytest.raises(ModelError) as info:
        peftkit.set_active(model, "second")
    assert "'second'" in str(info.value) and "'first'" in str(info.value)
    with pytest.raises(ModelError, match="'second'"):
        peftkit.set_active(model, ["first", "second"])
    assert_unchanged(model, before)

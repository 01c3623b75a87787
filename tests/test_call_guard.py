"""HF PEFT's per-call arguments that peftkit does not implement (``alora_offsets``) are refused,
never ignored (``adapter_names`` is served: test_serving.py); adapter names cannot escape a directory."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from conftest import model_inputs, tiny_bert, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "lora": lambda: peftkit.LoraConfig(init_lora_weights=False),
    "prompt": lambda: peftkit.PromptTuningConfig(num_virtual_tokens=2),
}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("arg, value", [("alora_offsets", [1, 1])])
def test_forward_with_a_per_call_argument_is_an_error_naming_it(method, arg, value) -> None:
    model = peftkit.apply(tiny_bert(), CONFIGS[method]())
    inputs = model_inputs("bert")
    with pytest.raises(peftkit.ConfigError, match=rf"BertForSequenceClassification.forward: the argument {arg}="):
        model(**inputs, **{arg: value})
    model(**inputs)  # without it the model runs


@pytest.mark.parametrize("arg", ["alora_offsets"])
def test_generate_with_a_per_call_argument_is_an_error_naming_it(arg) -> None:
    model = peftkit.apply(tiny_gpt2(), peftkit.LoraConfig(init_lora_weights=False))
    inputs = model_inputs("gpt2")
    with pytest.raises(peftkit.ConfigError, match=rf"GPT2LMHeadModel.generate: the argument {arg}="):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, **{arg: ["default", "default"]})
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)


def test_the_guard_follows_a_deep_copy_and_goes_with_unload() -> None:
    model = peftkit.apply(tiny_gpt2(), peftkit.LoraConfig(init_lora_weights=False))
    twin = copy.deepcopy(model)
    assert twin.generate.__self__ is twin  # bound to the copy, not to the original
    inputs = model_inputs("gpt2")
    with pytest.raises(peftkit.ConfigError, match="alora_offsets"):
        twin(**inputs, alora_offsets=[1, 1])
    with torch.no_grad():  # the copy serves mixed batches with its own adapters
        torch.testing.assert_close(twin(**inputs, adapter_names=["default", "__base__"]).logits[0],
                                   twin(**inputs).logits[0])
    peftkit.unload(model)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks and not model._forward_hooks
    assert type(model).generate is not None and model.generate.__func__ is type(model).generate


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "..", " padded ", "x\0y"])
def test_adapter_names_that_could_escape_a_directory_are_refused(name, tmp_path) -> None:
    with pytest.raises(peftkit.ConfigError, match="adapter name"):
        peftkit.apply(tiny_bert(), peftkit.LoraConfig(), name=name)
    model = peftkit.apply(tiny_bert(), peftkit.LoraConfig())
    peftkit.save(model, tmp_path)
    other = tiny_bert()
    with pytest.raises(peftkit.ConfigError, match="adapter name"):
        peftkit.load(other, tmp_path, name=name)
    assert not peftkit.state.has_adapters(other)

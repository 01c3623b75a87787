"""``LoraConfig(layer_replication=...)``: a deeper model from shared layers (peftkit.replication).

Tiny Llama (and BERT, HF's other layer list): the stacked list, weights shared not copied, an
adapter per stacked layer, the config's layer count and the KV cache, HF PEFT both ways, and
``unload`` / ``delete`` / a failed ``load`` putting the original layers back.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from conftest import model_inputs, tiny_bert, tiny_llama
from interop_helpers import assert_same, hf_from_pretrained, perturb_trainable, run
from peftkit.replication import StackedLayers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "adapter_model.safetensors"
MAP = [[0, 2], [1, 2]]  # layers 0, 1, 1


def pk_config(**kw) -> peftkit.LoraConfig:
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    kw.setdefault("layer_replication", MAP)
    kw.setdefault("init_lora_weights", False)
    return peftkit.LoraConfig(**kw)


def hf_config(**kw) -> "peft.LoraConfig":
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    kw.setdefault("layer_replication", MAP)
    kw.setdefault("init_lora_weights", False)
    kw.setdefault("task_type", "CAUSAL_LM")
    return peft.LoraConfig(**kw)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the stacked model ------------------------------------------------------------------------------


def test_apply_stacks_layers_sharing_their_weights() -> None:
    base = tiny_llama()
    model = peftkit.apply(tiny_llama(), pk_config(layer_replication=[[0, 2], [0, 2], [1, 2]]))
    layers = model.model.layers
    assert isinstance(layers, StackedLayers) and len(layers) == 5
    assert model.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3, 4]
    for i, j in [(0, 2), (1, 3), (1, 4)]:  # the copies of one layer share every base weight
        a, b = layers[i], layers[j]
        assert a is not b
        assert a.mlp.down_proj.weight is b.mlp.down_proj.weight
        assert a.self_attn.q_proj.base_layer.weight is b.self_attn.q_proj.base_layer.weight
        # ... but each has its own adapter
        assert a.self_attn.q_proj.adapters["default"] is not b.self_attn.q_proj.adapters["default"]
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert params(model) == params(base) + lora  # nothing weight-sized was copied
    plain = peftkit.apply(tiny_llama(), pk_config(layer_replication=None))
    assert lora == 5 * sum(p.numel() for n, p in plain.named_parameters() if "lora_" in n) // 2  # one set per layer
    assert len(peftkit.adapted_modules(model)) == 5 * 2
    assert model.config is layers[4].self_attn.config  # the copies read the model's config


def test_the_stacked_base_computes_the_deeper_model() -> None:
    """With init_lora_weights=True the adapted model is the stacked base: layers 0, 1, 1 by hand."""
    batch = model_inputs("llama")
    model = peftkit.apply(tiny_llama(), pk_config(init_lora_weights=True))
    ref = tiny_llama()
    ref.model.layers.append(ref.model.layers[1])  # the same module twice: shared weights
    ref.config.num_hidden_layers = 3
    ref.model.layers[2].self_attn.layer_idx = 2  # harmless without a cache, set as HF does
    with torch.no_grad():
        got = model(**batch, use_cache=False).logits
        want = ref(**batch, use_cache=False).logits
    assert_same(got, want, run(tiny_llama(), batch))


def test_generate_with_the_cache_equals_without() -> None:
    batch = model_inputs("llama")
    model = peftkit.apply(tiny_llama(), pk_config())
    perturb_trainable(model)
    model.eval()
    cached = model.generate(**batch, max_new_tokens=6, do_sample=False)
    plain = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    assert len(out.past_key_values.layers) == 3  # one cache entry per stacked layer


def test_unload_and_delete_restore_the_original_layers() -> None:
    batch = model_inputs("llama")
    for remove in ("unload", "delete"):
        model = tiny_llama()
        original = model.model.layers
        keys = set(model.state_dict())
        peftkit.apply(model, pk_config())
        perturb_trainable(model)
        model.eval()
        peftkit.unload(model) if remove == "unload" else peftkit.delete(model, "default")
        assert model.model.layers is original and type(original).__name__ == "ModuleList"
        assert model.config.num_hidden_layers == 2
        assert [layer.self_attn.layer_idx for layer in original] == [0, 1]
        assert set(model.state_dict()) == keys
        assert_same(run(model, batch), run(tiny_llama(), batch))
        assert all(p.requires_grad for p in model.parameters())


def test_merging_is_refused_and_changes_nothing() -> None:
    batch = model_inputs("llama")
    model = peftkit.apply(tiny_llama(), pk_config())
    perturb_trainable(model)
    model.eval()
    want = run(model, batch)
    for merge in (lambda: peftkit.merge(model), lambda: peftkit.unload(model, merge=True)):
        with pytest.raises(peftkit.ModelError, match="layer_replication"):
            merge()
        assert not peftkit.adapters.is_merged(model)
        assert_same(run(model, batch), want)
    with peftkit.disabled(model):  # the stacked base without adapters, as HF's disable_adapter
        assert len(model.model.layers) == 3


def test_every_adapter_of_a_model_gives_the_same_stacking() -> None:
    model = peftkit.apply(tiny_llama(), pk_config(), name="a")
    peftkit.apply(model, pk_config(target_modules=["o_proj"]), name="b")  # the same map: no second stacking
    assert len(model.model.layers) == 3
    assert "b" in model.model.layers[2].self_attn.o_proj.adapters
    with pytest.raises(peftkit.ConfigError, match="same layer_replication"):
        peftkit.apply(model, pk_config(layer_replication=[[0, 2]]), name="c")
    with pytest.raises(peftkit.ConfigError, match="same layer_replication"):
        peftkit.apply(model, pk_config(layer_replication=None), name="d")
    plain = peftkit.apply(tiny_llama(), pk_config(layer_replication=None), name="a")
    with pytest.raises(peftkit.ConfigError, match="same layer_replication"):
        peftkit.apply(plain, pk_config(), name="b")
    assert len(plain.model.layers) == 2


def test_mixed_batch_over_stacked_layers() -> None:
    batch = model_inputs("llama")
    model = peftkit.apply(tiny_llama(), pk_config(), name="a")
    peftkit.apply(model, pk_config(r=2), name="b")
    perturb_trainable(model)
    for p in (p for n, p in model.named_parameters() if ".adapters.a." in n):
        p.data.normal_(std=0.2)
    model.eval()
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["a", "b"]).logits
    for row, name in enumerate(["a", "b"]):
        peftkit.set_active(model, name)
        assert_same(mixed[row:row + 1], run(model, {k: v[row:row + 1] for k, v in batch.items()}))


@pytest.mark.parametrize("value, match", [
    ([[0, 3]], "beyond the model's 2 layers"),
])
def test_apply_refusals_leave_the_model_unchanged(value, match) -> None:
    model = tiny_llama()
    original = model.model.layers
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.apply(model, pk_config(layer_replication=value))
    assert model.model.layers is original and model.config.num_hidden_layers == 2
    assert not peftkit.state.has_adapters(model)


def test_a_refusal_after_stacking_puts_the_layers_back() -> None:
    model = tiny_llama()
    original = model.model.layers
    with pytest.raises(peftkit.ConfigError, match="matched no module"):
        peftkit.apply(model, pk_config(target_modules=["no_such_proj"]))
    assert model.model.layers is original and model.config.num_hidden_layers == 2


@pytest.mark.parametrize("value", [[[2, 1]], [[0]], [[0, 1.5]], "0-2", [[-1, 1]]])
def test_bad_maps_are_config_errors(value) -> None:
    with pytest.raises(peftkit.ConfigError, match="layer_replication"):
        peftkit.LoraConfig(layer_replication=value)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inits_writing_into_the_shared_base_are_refused(init) -> None:
    with pytest.raises(peftkit.ConfigError, match="layer_replication.*writes into the base"):
        peftkit.LoraConfig(layer_replication=MAP, init_lora_weights=init)


def test_a_model_without_a_known_layer_list_is_refused() -> None:
    model = peftkit.apply(tiny_llama(), peftkit.LoraConfig(target_modules=["q_proj"]))  # fine without it
    peftkit.unload(model)
    from conftest import tiny_gpt2  # GPT-2's transformer.h is not where HF PEFT looks

    with pytest.raises(peftkit.ConfigError, match="cannot find the layer list"):
        peftkit.apply(tiny_gpt2(), peftkit.LoraConfig(target_modules=["c_attn"], layer_replication=MAP))


# -- HF PEFT both ways --------------------------------------------------------------------------------


CASES = [
    ("llama", dict()),
    ("llama", dict(layer_replication=[[0, 2], [0, 2], [1, 2]], target_modules=["q_proj", "down_proj"],
                   layers_to_transform=[1, 3, 4])),
    ("bert", dict(layer_replication=[[1, 2], [0, 2]], target_modules=["query", "value"], task_type="SEQ_CLS")),
]
BUILD = {"llama": tiny_llama, "bert": tiny_bert}


@pytest.mark.parametrize("kind, kw", CASES, ids=["llama", "llama-layers-to-transform", "bert"])
def test_peftkit_file_loads_in_hf(kind, kw, tmp_path) -> None:
    batch = model_inputs(kind)
    model = peftkit.apply(BUILD[kind](), pk_config(**{k: v for k, v in kw.items() if k != "task_type"}))
    assert perturb_trainable(model) > 0
    model.eval()
    want = run(model, batch)
    peftkit.save(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["layer_replication"] == kw.get("layer_replication", MAP)
    hf = hf_from_pretrained(BUILD[kind](), tmp_path)
    assert_same(run(hf, batch), want, run(BUILD[kind](), batch))
    # every tensor landed where HF keeps it
    theirs = peft.get_peft_model_state_dict(hf)
    for key, tensor in load_file(tmp_path / WEIGHTS).items():
        assert torch.equal(theirs[key], tensor), key
    if kind == "llama":
        assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False),
                           hf.generate(**batch, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("kind, kw", CASES, ids=["llama", "llama-layers-to-transform", "bert"])
def test_hf_file_loads_in_peftkit(kind, kw, tmp_path) -> None:
    batch = model_inputs(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(BUILD[kind](), hf_config(**kw))
    assert perturb_trainable(hf) > 0
    hf.eval()
    want = run(hf, batch)
    hf.save_pretrained(tmp_path)
    keys = load_file(tmp_path / WEIGHTS)
    stacked = sum(len(range(s, e)) for s, e in kw.get("layer_replication", MAP))
    assert any(f".{stacked - 1}." in k for k in keys)  # keyed by the stacked positions
    model = peftkit.load(BUILD[kind](), tmp_path)
    assert_same(run(model, batch), want, run(BUILD[kind](), batch))


def test_a_failed_load_puts_the_layers_back(tmp_path) -> None:
    hf = peft.get_peft_model(tiny_llama(), hf_config())
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(3, 32)  # a wrong shape
    save_file(tensors, tmp_path / WEIGHTS)
    model = tiny_llama()
    original = model.model.layers
    with pytest.raises(peftkit.AdapterFileError, match="layers.2.self_attn.q_proj"):
        peftkit.load(model, tmp_path)
    assert model.model.layers is original and model.config.num_hidden_layers == 2
    assert not peftkit.state.has_adapters(model)

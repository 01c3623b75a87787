"""``LoraConfig(trainable_token_indices=...)``: only chosen embedding rows train (peftkit.tokens).

The reference for what the rows do is the base model with those rows written into its embedding
(the LM head sees them too when tied); HF PEFT both ways on tiny GPT-2 (tied) and Llama (tied
and untied), with every trainable tensor moved off its initial value first.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from conftest import model_inputs, tiny_gpt2, tiny_llama
from interop_helpers import check_saved_file_in_hf, assert_same, hf_from_pretrained, perturb_trainable, run
from peftkit.tokens import TokenRows

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "adapter_model.safetensors"
IDS = [3, 5, 7]


def tied_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama, "tied_llama": tied_llama}
EMB = {"gpt2": "transformer.wte", "llama": "model.embed_tokens", "tied_llama": "model.embed_tokens"}
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "tied_llama": ["q_proj", "v_proj"]}


def inputs(kind: str = "llama") -> dict:
    """Random ids with the trained tokens in both rows."""
    batch = model_inputs(kind, length=9)
    batch["input_ids"][0, 2], batch["input_ids"][1, 4], batch["input_ids"][1, 6] = 5, 3, 7
    return batch


def pk_config(kind: str, **kw) -> peftkit.LoraConfig:
    kw.setdefault("trainable_token_indices", IDS)
    kw.setdefault("init_lora_weights", False)
    return peftkit.LoraConfig(target_modules=TARGETS[kind], **kw)


def hf_config(kind: str, **kw) -> "peft.LoraConfig":
    kw.setdefault("trainable_token_indices", IDS)
    kw.setdefault("init_lora_weights", False)
    return peft.LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS[kind], **kw)


def rows_of(model, name: str = "default", path: str = "model.embed_tokens") -> torch.Tensor:
    module = model.get_submodule(path)
    return module.adapters[name].trainable_tokens_delta


def with_rows(base, path: str, ids: list[int], rows: torch.Tensor):
    """The base model with ``rows`` written into ``path``'s weight (and so into a tied head)."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.get_submodule(path).weight[ids] = rows.detach().to(ref.get_submodule(path).weight.dtype)
    return ref


# -- what the rows do ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "tied_llama"])
def test_identity_at_init_and_only_the_rows_train(kind) -> None:
    batch = inputs(kind)
    base = BUILD[kind]()
    model = peftkit.apply(BUILD[kind](), pk_config(kind, init_lora_weights=True))
    assert torch.equal(run(model, batch), run(base, batch))
    rows = rows_of(model, path=EMB[kind])
    assert rows.shape == (3, 32) and rows.requires_grad
    emb = model.get_submodule(EMB[kind])
    assert torch.equal(rows, emb.base_layer.weight[IDS])
    assert not emb.base_layer.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if "trainable_tokens_delta" in n) == 3 * 32


@pytest.mark.parametrize("kind", ["llama", "gpt2", "tied_llama"])
def test_output_is_the_base_with_the_rows_replaced(kind) -> None:
    """Untied: only positions holding the tokens change. Tied (GPT-2, tied Llama): the LM head
    scores the tokens with the new rows as well."""
    batch = inputs(kind)
    model = peftkit.apply(BUILD[kind](), pk_config(kind, init_lora_weights=True))
    with torch.no_grad():
        rows_of(model, path=EMB[kind]).add_(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)))
    ref = with_rows(BUILD[kind](), EMB[kind], IDS, rows_of(model, path=EMB[kind]))
    assert_same(run(model, batch), run(ref, batch), run(BUILD[kind](), batch))
    plain = model_inputs(kind, length=9)  # none of the tokens in it
    plain["input_ids"][torch.isin(plain["input_ids"], torch.tensor(IDS))] = 9
    got, base = run(model, plain), run(BUILD[kind](), plain)
    if kind == "llama":
        assert torch.equal(got, base)
    else:
        others = [i for i in range(120) if i not in IDS]
        assert torch.equal(got[..., others], base[..., others])
        assert (got[..., IDS] - base[..., IDS]).abs().max() > 1e-3


def test_gradients_reach_only_the_rows_of_the_tokens_seen() -> None:
    model = peftkit.apply(tiny_llama(), pk_config("llama", init_lora_weights=True))
    model.train()
    batch = inputs("llama")
    batch["input_ids"][batch["input_ids"] == 7] = 9  # token 7 never appears
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grad = rows_of(model).grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    assert torch.equal(grad[2], torch.zeros(32))
    assert model.model.embed_tokens.base_layer.weight.grad is None


def test_training_changes_only_the_chosen_rows_of_the_merged_embedding() -> None:
    model = peftkit.apply(tiny_llama(), peftkit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = inputs("llama")
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    model.eval()
    before = run(model, batch)
    peftkit.unload(model, merge=True)
    assert_same(run(model, batch), before)
    changed = (model.model.embed_tokens.weight != tiny_llama().model.embed_tokens.weight).any(dim=1)
    assert changed.nonzero().flatten().tolist() == IDS


# -- merge, unmerge, unload, delete -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_and_unload(kind) -> None:
    batch = inputs(kind)
    model = peftkit.apply(BUILD[kind](), pk_config(kind))
    perturb_trainable(model)
    model.eval()
    want = run(model, batch)
    weight = model.get_submodule(EMB[kind]).base_layer.weight
    original = weight.detach().clone()
    peftkit.merge(model)
    assert torch.equal(weight[IDS], rows_of(model, path=EMB[kind]).detach())
    assert_same(run(model, batch), want)
    peftkit.unmerge(model)
    assert torch.equal(weight, original)
    assert_same(run(model, batch), want)
    with peftkit.disabled(model):
        assert_same(run(model, batch), run(BUILD[kind](), batch))
    keys = set(BUILD[kind]().state_dict())
    peftkit.unload(model)
    assert set(model.state_dict()) == keys
    assert_same(run(model, batch), run(BUILD[kind](), batch))


def test_delete_restores_the_embedding_and_head() -> None:
    model = peftkit.apply(tiny_gpt2(), pk_config("gpt2"))
    peftkit.delete(model, "default")
    assert type(model.transformer.wte).__name__ == "Embedding"
    assert type(model.lm_head).__name__ == "Linear"
    assert model.lm_head.weight is model.transformer.wte.weight


def test_two_token_adapters_cannot_be_active_together_on_one_layer() -> None:
    model = peftkit.apply(tiny_llama(), pk_config("llama"), name="a")
    peftkit.apply(model, pk_config("llama", trainable_token_indices=[10, 11]), name="b")
    with pytest.raises(peftkit.ModelError, match="cannot be active together"):
        peftkit.set_active(model, ["a", "b"])
    assert peftkit.active_adapters(model) == ["b"]


def test_rows_and_lora_on_the_same_embedding_from_two_adapters_merge_exactly() -> None:
    """A LoRA adapter on the embedding and a token adapter, both active: merged equals unmerged
    (the rows merge first, the LoRA update is added on top of them, as unmerged)."""
    batch = inputs("llama")
    model = peftkit.apply(tiny_llama(), peftkit.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False),
                          name="lora")
    peftkit.apply(model, pk_config("llama"), name="tok")
    perturb_trainable(model)
    for p in model.model.embed_tokens.adapters["lora"].parameters():
        p.data.normal_()
    peftkit.set_active(model, ["lora", "tok"])
    model.eval()
    want = run(model, batch)
    peftkit.merge(model)
    assert_same(run(model, batch), want)
    peftkit.unmerge(model)
    assert_same(run(model, batch), want)
    assert torch.allclose(model.model.embed_tokens.base_layer.weight, tiny_llama().model.embed_tokens.weight,
                          atol=1e-6)  # LoRA's update is subtracted again: equal up to rounding


# -- mixed-adapter batches ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batch_rows_each_use_their_adapter(kind) -> None:
    batch = inputs(kind)
    model = peftkit.apply(BUILD[kind](), pk_config(kind), name="a")
    peftkit.apply(model, pk_config(kind, trainable_token_indices=[5, 9]), name="b")
    perturb_trainable(model)
    model.eval()
    names = ["a", "b"]
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
    for row, name in enumerate(names):
        peftkit.set_active(model, name)
        single = run(model, {k: v[row:row + 1] for k, v in batch.items()})
        assert_same(mixed[row:row + 1], single)
    with torch.no_grad():
        based = model(**batch, adapter_names=["__base__", "b"]).logits
    assert_same(based[:1], run(BUILD[kind](), {k: v[:1] for k, v in batch.items()}))


# -- the file -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_file_holds_the_rows_not_the_embedding(kind, tmp_path) -> None:
    model = peftkit.apply(BUILD[kind](), pk_config(kind))
    peftkit.save(model, tmp_path / "pk")
    ours = load_file(tmp_path / "pk" / WEIGHTS)
    key = f"base_model.model.{EMB[kind]}.token_adapter.trainable_tokens_delta"
    assert ours[key].shape == (3, 32)
    assert not any(v.shape[0] == 120 for v in ours.values())  # nothing vocabulary-sized
    data = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    assert data["trainable_token_indices"] == IDS
    assert not any("embed" in t or "wte" in t for t in data["target_modules"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(BUILD[kind](), hf_config(kind))
        hf.save_pretrained(tmp_path / "hf")
    theirs = load_file(tmp_path / "hf" / WEIGHTS)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}


# -- HF PEFT both ways --------------------------------------------------------------------------

CASES = [
    ("gpt2", {}),
    ("llama", {}),
    ("tied_llama", {}),
    ("tied_llama", {"trainable_token_indices": {"embed_tokens": IDS}}),
    ("tied_llama", {"trainable_token_indices": {"embed_tokens": IDS, "lm_head": IDS}}),
    ("llama", {"trainable_token_indices": {"embed_tokens": IDS, "lm_head": [1, 2, 3, 4]}}),
]
CASE_IDS = ["gpt2", "llama", "tied-llama", "tied-llama-dict", "tied-llama-both-named", "llama-own-head-rows"]


@pytest.mark.parametrize("kind, kw", CASES, ids=CASE_IDS)
def test_peftkit_file_loads_in_hf(kind, kw, tmp_path) -> None:
    batch = inputs(kind)
    model = peftkit.apply(BUILD[kind](), pk_config(kind, **kw))
    assert perturb_trainable(model) > 0
    check_saved_file_in_hf(model, BUILD[kind], batch, tmp_path, quiet=UserWarning)


@pytest.mark.parametrize("kind, kw", CASES, ids=CASE_IDS)
def test_hf_file_loads_in_peftkit(kind, kw, tmp_path) -> None:
    batch = inputs(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hf = peft.get_peft_model(BUILD[kind](), hf_config(kind, **kw))
    assert perturb_trainable(hf) > 0
    hf.eval()
    want = run(hf, batch)
    hf.save_pretrained(tmp_path)
    model = peftkit.load(BUILD[kind](), tmp_path)
    assert_same(run(model, batch), want, run(BUILD[kind](), batch))


def test_hf_file_of_a_resized_vocabulary_loads_in_peftkit(tmp_path) -> None:
    """New tokens added to a tied model: HF PEFT saves the resized embedding layers as well (its
    base config has the old vocabulary); peftkit loads them into the base and the rows on top."""
    tied_llama().save_pretrained(tmp_path / "base")
    from transformers import LlamaForCausalLM

    def resized():
        torch.manual_seed(1)
        m = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
        m.resize_token_embeddings(124)
        return m

    new = [120, 121, 122, 123]
    batch = inputs("llama")
    batch["input_ids"][:, -2:] = torch.tensor([[120, 123], [121, 122]])
    hf = peft.get_peft_model(resized(), hf_config("tied_llama", trainable_token_indices=new))
    perturb_trainable(hf)
    hf.eval()
    want = run(hf, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hf.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / WEIGHTS)
    assert "base_model.model.model.embed_tokens.token_adapter.base_layer.weight" in saved
    fresh = resized()
    with torch.no_grad():  # the new rows of a fresh resize are random: the file's base weight must win
        fresh.model.embed_tokens.weight[120:] = 0
    model = peftkit.load(fresh, tmp_path / "adapter")
    assert_same(run(model, batch), want)

    peftkit.save(model, tmp_path / "again")  # peftkit writes the rows only
    assert not any(v.shape[0] == 124 for v in load_file(tmp_path / "again" / WEIGHTS).values())


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"trainable_token_indices": [3, 500]}, "out of range"),
    ({"trainable_token_indices": {"no_such_layer": [3]}}, "matches no module"),
    ({"trainable_token_indices": {"embed_tokens": [3], "lm_head": [4]}}, "shares its weight"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "also in target_modules"),
    ({"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
    ({"trainable_token_indices": {"model.norm": [3]}}, "nn.Embedding or an nn.Linear"),
])
def test_refusals_leave_the_model_unchanged(kw, match) -> None:
    model = tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {"target_modules": ["q_proj"], "trainable_token_indices": IDS, **kw}
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.apply(model, peftkit.LoraConfig(**kw))
    assert not peftkit.state.has_adapters(model)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("value", [[], [1, 1], [-1], [True], "3", {"embed_tokens": []}, {}])
def test_bad_indices_are_config_errors(value) -> None:
    with pytest.raises(peftkit.ConfigError, match="trainable_token_indices"):
        peftkit.LoraConfig(trainable_token_indices=value)


def test_units_are_token_rows() -> None:
    model = peftkit.apply(tiny_gpt2(), pk_config("gpt2"))
    emb, head = model.transformer.wte.adapters["default"], model.lm_head.adapters["default"]
    assert isinstance(emb, TokenRows) and isinstance(head, TokenRows)
    assert not emb.tied and head.tied
    assert list(head.parameters()) == []  # the head reads the embedding's rows


def test_hot_swapping_refuses_token_rows() -> None:
    model = peftkit.apply(tiny_llama(), pk_config("llama"))
    with pytest.raises(peftkit.ModelError, match="trainable_token_indices"):
        peftkit.prepare_hotswap(model, 16)

"""``LoraConfig(target_parameters=...)``: LoRA on stacked expert weights (peftkit.param_lora).

A tiny Mixtral (transformers 5: ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``down_proj``
(E, H, I) on one ``MixtralExperts`` module), a router weight (2-d) and a custom experts module
stored transposed (E, in, out); HF PEFT both ways with every adapter tensor moved off its
initial value, merged and unmerged.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from interop_helpers import check_saved_file_in_hf, assert_same, hf_from_pretrained, perturb_trainable, run
from peftkit.param_lora import ParamLayer, ParamLora

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "adapter_model.safetensors"
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return MixtralForCausalLM(cfg).eval()


class TransposedExperts(nn.Module):
    """Experts stored (E, in, out), as some MoE implementations keep them (``is_transposed``)."""

    is_transposed = True

    def __init__(self, experts: int = 3, n_in: int = 8, n_out: int = 6) -> None:
        super().__init__()
        self.weight3 = nn.Parameter(torch.randn(experts, n_in, n_out) * 0.3)
        self.mix = nn.Parameter(torch.randn(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_expert = torch.einsum("bti,eio->bteo", x, self.weight3)
        return (per_expert * self.mix.softmax(0).view(1, 1, -1, 1)).sum(2)


class TinyExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TransposedExperts()
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.block(x)))


def tiny_experts(seed: int = 0) -> TinyExperts:
    torch.manual_seed(seed)
    return TinyExperts().eval()


BUILD = {"mixtral": tiny_mixtral, "experts": tiny_experts}
TASK = {"mixtral": "CAUSAL_LM", "experts": None}


def inputs(kind: str = "mixtral") -> dict:
    g = torch.Generator().manual_seed(1)
    if kind == "experts":
        return {"x": torch.randn(2, 5, 8, generator=g)}
    return {"input_ids": torch.randint(1, 64, (2, 7), generator=g)}


CASES = [
    ("mixtral", dict(target_modules=[], target_parameters=EXPERTS)),
    ("mixtral", dict(target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"], r=2, lora_alpha=6,
                     rank_pattern={"down_proj": 3}, alpha_pattern={"layers.1.mlp.experts.down_proj": 2})),
    ("mixtral", dict(target_modules=[], target_parameters=["model.layers.1.mlp.experts.gate_up_proj"], r=4,
                     lora_alpha=8, use_rslora=True)),
    ("mixtral", dict(target_modules=[], target_parameters=["mlp.gate.weight"], r=2)),
    ("mixtral", dict(target_parameters=["mlp.experts.gate_up_proj"], r=2)),  # None: the model type's defaults too
    ("experts", dict(target_modules=[], target_parameters=["block.weight3"], r=2, lora_alpha=3)),
]
CASE_IDS = ["experts-both", "down-with-q-and-patterns", "full-name-rslora", "router-2d", "default-modules",
            "transposed"]


def pk_config(**kw) -> peftkit.LoraConfig:
    kw.setdefault("init_lora_weights", False)
    return peftkit.LoraConfig(**kw)


def hf_model(kind: str, **kw):
    kw.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF warns that rank_pattern keys match no *module*
        return peft.get_peft_model(BUILD[kind](), peft.LoraConfig(task_type=TASK[kind], **kw))


# -- the unit and its file ------------------------------------------------------------------------


def test_identity_at_init_and_only_the_pairs_train() -> None:
    batch = inputs()
    model = peftkit.apply(tiny_mixtral(), peftkit.LoraConfig(target_modules=[], target_parameters=EXPERTS))
    assert torch.equal(run(model, batch), run(tiny_mixtral(), batch))
    host = model.model.layers[0].mlp.experts
    assert isinstance(host, ParamLayer) and isinstance(host.adapters["default"], ParamLora)
    assert list(host.adapters["default"].factors) == ["gate_up_proj", "down_proj"]  # the module's order
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert not host.base_layer.gate_up_proj.requires_grad
    assert peftkit.adapted_modules(model) == []  # no module is adapted: the file's target_modules stay []


def test_file_keys_and_shapes_are_hf_s(tmp_path) -> None:
    kw = dict(target_modules=[], target_parameters=EXPERTS, r=2, rank_pattern={"down_proj": 3})
    model = peftkit.apply(tiny_mixtral(), pk_config(**kw))
    peftkit.save(model, tmp_path / "pk")
    hf_model("mixtral", **kw).save_pretrained(tmp_path / "hf")
    ours, theirs = load_file(tmp_path / "pk" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    layer = "base_model.model.model.layers.0.mlp.experts"
    # HF nests one wrapper per parameter, the first of the module innermost
    assert ours[f"{layer}.base_layer.lora_A.weight"].shape == (4 * 2, 16)  # gate_up: (E·r, hidden)
    assert ours[f"{layer}.base_layer.lora_B.weight"].shape == (48, 4 * 2)  # (2·intermediate, E·r)
    assert ours[f"{layer}.lora_A.weight"].shape == (4 * 3, 24)  # down: (E·r, intermediate)
    assert ours[f"{layer}.lora_B.weight"].shape == (16, 4 * 3)


def test_delta_is_hf_s_per_expert_layout() -> None:
    """Expert e's pair: rows e·r.. of A, columns r_i·E + e of B (HF's reshape), checked by hand."""
    model = peftkit.apply(tiny_mixtral(), pk_config(target_modules=[], target_parameters=["mlp.experts.down_proj"],
                                                    r=2, lora_alpha=2))
    pair = model.model.layers[0].mlp.experts.adapters["default"].factors["down_proj"]
    a, b = pair.lora_A.detach(), pair.lora_B.detach()
    delta = pair.delta(torch.float32)
    for e in range(4):
        a_e = a[e * 2:(e + 1) * 2]  # (r, in)
        b_e = b[:, [ri * 4 + e for ri in range(2)]]  # (out, r)
        torch.testing.assert_close(delta[e], b_e @ a_e)
    base = model.model.layers[0].mlp.experts.base_layer.down_proj
    torch.testing.assert_close(pair.fold(base.detach()), base.detach() + delta)


# -- HF PEFT both ways ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, kw", CASES, ids=CASE_IDS)
def test_peftkit_file_loads_in_hf_and_merges_alike(kind, kw, tmp_path) -> None:
    batch = inputs(kind)
    model = peftkit.apply(BUILD[kind](), pk_config(**kw))
    assert perturb_trainable(model) > 0
    check_saved_file_in_hf(model, BUILD[kind], batch, tmp_path, quiet=RuntimeWarning)


@pytest.mark.parametrize("kind, kw", CASES, ids=CASE_IDS)
def test_hf_file_loads_in_peftkit(kind, kw, tmp_path) -> None:
    batch = inputs(kind)
    hf = hf_model(kind, **kw)
    assert perturb_trainable(hf) > 0
    hf.eval()
    want = run(hf, batch)
    hf.save_pretrained(tmp_path)
    model = peftkit.load(BUILD[kind](), tmp_path)
    assert_same(run(model, batch), want, run(BUILD[kind](), batch))


def test_two_adapters_active_together_as_in_hf(tmp_path) -> None:
    batch = inputs()
    hf = hf_model("mixtral", target_modules=[], target_parameters=EXPERTS)
    hf.add_adapter("b", peft.LoraConfig(target_modules=[], target_parameters=EXPERTS, r=2, init_lora_weights=False))
    perturb_trainable(hf)
    for p in (p for n, p in hf.named_parameters() if ".b." in n or n.endswith(".b.weight")):
        p.data.normal_(std=0.2)
    hf.save_pretrained(tmp_path)
    hf.base_model.set_adapter(["default", "b"])
    hf.eval()
    model = peftkit.load(tiny_mixtral(), tmp_path, name="a")
    peftkit.load(model, tmp_path / "b", name="b")
    peftkit.set_active(model, ["a", "b"])
    both = run(model, batch)
    assert_same(both, run(hf, batch))
    peftkit.set_active(model, "a")
    assert (run(model, batch) - both).abs().max() > 1e-3


# -- merging, training, the rest -----------------------------------------------------------------


def test_merge_unmerge_disable_unload() -> None:
    batch = inputs()
    model = peftkit.apply(tiny_mixtral(), pk_config(target_modules=["q_proj"], target_parameters=EXPERTS))
    perturb_trainable(model)
    model.eval()
    want, base = run(model, batch), run(tiny_mixtral(), batch)
    host = model.model.layers[1].mlp.experts
    original = host.base_layer.down_proj.detach().clone()
    peftkit.merge(model)
    assert host.merged == ["default"]
    assert_same(run(model, batch), want)
    peftkit.unmerge(model)
    assert torch.allclose(host.base_layer.down_proj, original, atol=1e-6)
    assert_same(run(model, batch), want)
    with peftkit.disabled(model):
        assert_same(run(model, batch), base)
    keys = set(tiny_mixtral().state_dict())
    peftkit.unload(model)
    assert set(model.state_dict()) == keys
    assert type(model.model.layers[1].mlp.experts).__name__ == "MixtralExperts"
    assert_same(run(model, batch), base)


def test_a_training_step_moves_only_the_pairs() -> None:
    model = peftkit.apply(tiny_mixtral(), peftkit.LoraConfig(target_modules=[], target_parameters=EXPERTS))
    model.train()
    batch = inputs()
    before = run(model, batch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    pair = model.model.layers[0].mlp.experts.adapters["default"].factors["gate_up_proj"]
    assert pair.lora_B.grad is not None and pair.lora_B.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.experts.base_layer.gate_up_proj.grad is None
    opt.step()
    assert (run(model, batch) - before).abs().max() > 1e-4


def test_mixed_batches_are_refused_naming_the_layer() -> None:
    model = peftkit.apply(tiny_mixtral(), pk_config(target_modules=[], target_parameters=EXPERTS), name="a")
    peftkit.apply(model, pk_config(target_modules=[], target_parameters=EXPERTS), name="b")
    with pytest.raises(peftkit.ConfigError, match=r"cannot serve rows of a mixed-adapter batch.*mlp\.experts"):
        model(**inputs(), adapter_names=["a", "b"])
    with torch.no_grad():  # rows of the base alone pass the experts untouched
        based = model(**inputs(), adapter_names=["__base__", "__base__"]).logits
    assert_same(based, run(tiny_mixtral(), inputs()))


@pytest.mark.parametrize("kw, match", [
    (dict(target_parameters=EXPERTS, lora_dropout=0.1), "lora_dropout"),
    (dict(target_parameters=EXPERTS, use_dora=True), "use_dora"),
    (dict(target_parameters=EXPERTS, fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(target_parameters="mlp.experts.down_proj"), "list of parameter names"),
    (dict(target_parameters=EXPERTS, init_lora_weights="pissa"), "init_lora_weights"),
])
def test_config_refusals(kw, match) -> None:
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.LoraConfig(target_modules=[], **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(target_modules=[], target_parameters=["mlp.experts.nothing"]), "matched no parameter"),
    (dict(target_modules=["q_proj"], target_parameters=["self_attn.q_proj.weight"]), "adapts already"),
    (dict(target_modules=[], target_parameters=["model.norm.weight"]), "2-d .* or a 3-d"),
])
def test_apply_refusals_leave_the_model_unchanged(kw, match) -> None:
    model = tiny_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.ConfigError, match=match):
        peftkit.apply(model, peftkit.LoraConfig(**kw))
    assert not peftkit.state.has_adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(before)


def test_delete_puts_the_experts_module_back() -> None:
    model = peftkit.apply(tiny_mixtral(), pk_config(target_modules=[], target_parameters=EXPERTS))
    peftkit.delete(model, "default")
    assert all(type(layer.mlp.experts).__name__ == "MixtralExperts" for layer in model.model.layers)
    assert not peftkit.state.has_adapters(model)


def test_hot_swapping_refuses_parameter_targets() -> None:
    model = peftkit.apply(tiny_mixtral(), pk_config(target_modules=[], target_parameters=EXPERTS))
    with pytest.raises(peftkit.ModelError, match="target_parameters"):
        peftkit.prepare_hotswap(model, 16)

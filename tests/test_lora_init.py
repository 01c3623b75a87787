"""LoRA's data-driven initialisations (PiSSA, OLoRA, orthogonal, LoftQ), their files both ways
with HF PEFT, the conversion to a plain LoRA, ``lora_bias``, and ``peftkit train --init``.

Each init is checked for its defining property on the weights, against HF PEFT's own init where
HF's runs on a CPU (PiSSA and OLoRA bit for bit), and through files both ways: an adapter is
perturbed as training would (random, non-zero), saved, loaded into a *fresh* base (the loader
runs the init again), and must compute what the trained model computed.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import peftkit
from conftest import model_inputs, tiny_bert, tiny_gpt2, tiny_llama
from interop_helpers import assert_same, hf_from_pretrained, perturb_trainable, run
from peftkit.methods import lora_init
from peftkit.state import hosts

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def units(model, name="default"):
    """(path, host, unit) of adapter ``name``."""
    return [(p, h, h.adapters[name]) for p, h in hosts(model) if hasattr(h, "adapters") and name in h.adapters]


def weight_of(module: nn.Module) -> torch.Tensor:
    """(out, in) of a Linear or Conv1D."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def matrix(out: int = 24, n_in: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n_in, generator=g)


# -- the defining properties ---------------------------------------------------------------------


@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_pissa_factors_are_the_principal_singular_triplets(scaling) -> None:
    w, r = matrix(), 5
    a, b, residual = lora_init.pissa(w, r, scaling)
    torch.testing.assert_close(residual + scaling * b @ a, w, rtol=0, atol=1e-5)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    # s·B·A is the best rank-r approximation of W: its singular values are W's top r ...
    torch.testing.assert_close(torch.linalg.svdvals(scaling * b @ a)[:r], s[:r], rtol=1e-5, atol=1e-5)
    # ... and the residual holds the rest
    torch.testing.assert_close(torch.linalg.svdvals(residual)[: len(s) - r], s[r:], rtol=1e-5, atol=1e-5)
    # A's rows are √(S/s) times the top right singular vectors, B's columns the left ones
    torch.testing.assert_close(a, torch.sqrt(s[:r] / scaling)[:, None] * vh[:r], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, u[:, :r] * torch.sqrt(s[:r] / scaling), rtol=1e-5, atol=1e-6)


def test_pissa_niter_is_a_randomized_svd_close_to_the_full_one() -> None:
    w, r = matrix(seed=1), 4
    torch.manual_seed(0)
    a, b, residual = lora_init.pissa(w, r, 1.0, iterations=8)
    torch.testing.assert_close(residual + b @ a, w, rtol=0, atol=1e-5)
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(b @ a)[:r], s[:r], rtol=2e-2, atol=0)


def test_olora_factors_are_the_qr_decomposition() -> None:
    w, r, scaling = matrix(seed=2), 6, 0.5
    a, b, residual = lora_init.olora(w, r, scaling)
    torch.testing.assert_close(residual + scaling * b @ a, w, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.t() @ b, torch.eye(r), rtol=0, atol=1e-5)  # orthonormal columns
    assert torch.equal(a, torch.triu(a))  # R[:r]: upper triangular
    q, upper = torch.linalg.qr(w)
    torch.testing.assert_close(b @ a, q[:, :r] @ upper[:r], rtol=0, atol=1e-6)


def test_orthogonal_factors_multiply_to_zero() -> None:
    torch.manual_seed(3)
    a, b = lora_init.orthogonal(40, 24, 6)
    assert a.shape == (6, 40) and b.shape == (24, 6)
    assert b.abs().max() > 1e-3 and a.abs().max() > 1e-3  # neither is zero ...
    assert (b @ a).abs().max() < 1e-6  # ... and their product is
    with pytest.raises(peftkit.ConfigError, match=r"even rank.*r=5"):
        lora_init.orthogonal(40, 24, 5)


NF4_CODES = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                          -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                          0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                          0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def nf4_by_hand(w: torch.Tensor) -> torch.Tensor:
    """NF4 (QLoRA's 16 normal-float codes) per block of 64 values, scaled by the block's absmax."""
    flat = w.reshape(-1, 64)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    codes = NF4_CODES[(flat / absmax).unsqueeze(-1).sub(NF4_CODES).abs().argmin(dim=-1)]
    return (codes * absmax).reshape(w.shape)


def loftq_by_hand(w: torch.Tensor, r: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ's alternation written out: (Q, L·R)."""
    low_rank = torch.zeros_like(w)
    for _ in range(iterations):
        q = nf4_by_hand(w - low_rank)
        u, s, vh = torch.linalg.svd(w - q)
        low_rank = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    return q, low_rank


def test_nf4_roundtrip_matches_a_hand_computed_nf4() -> None:
    w = matrix(16, 64, seed=4)
    torch.testing.assert_close(lora_init.nf4_roundtrip(w), nf4_by_hand(w), rtol=0, atol=1e-6)


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("scaling", [1.0, 0.25])
def test_loftq_matches_a_hand_computed_reference_and_beats_plain_nf4(iterations, scaling) -> None:
    w, r = matrix(32, 64, seed=5), 4
    a, b, q = lora_init.loftq(w, r, scaling, bits=4, iterations=iterations)
    want_q, want_lr = loftq_by_hand(w, r, iterations)
    torch.testing.assert_close(q, want_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(scaling * b @ a, want_lr, rtol=0, atol=1e-4)
    plain = (w - lora_init.nf4_roundtrip(w)).norm()
    ours = (w - (q + scaling * b @ a)).norm()
    assert ours < 0.95 * plain, (ours, plain)


def test_loftq_8_bit_beats_plain_int8() -> None:
    w, r = matrix(32, 64, seed=6), 8
    a, b, q = lora_init.loftq(w, r, 1.0, bits=8, iterations=2)
    assert (w - (q + b @ a)).norm() < (w - lora_init.int8_roundtrip(w)).norm()


# -- through apply: the base, identity at init, HF PEFT's own init --------------------------------


def _pk(build, init, targets, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return peftkit.apply(build(), peftkit.LoraConfig(init_lora_weights=init, target_modules=targets, **kw))


def _hf(build, init, targets, task="CAUSAL_LM", **kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return peft.get_peft_model(build(), peft.LoraConfig(init_lora_weights=init, target_modules=targets,
                                                        task_type=task, **kw))


@pytest.mark.parametrize("kind, init, kw", [
    ("llama", "pissa", {}),
    ("llama", "pissa", {"use_rslora": True, "rank_pattern": {"down_proj": 2}}),
    ("llama", "olora", {}),
    ("llama", "pissa", {"use_dora": True}),
    ("gpt2", "pissa", {"fan_in_fan_out": True}),
])
def test_pissa_and_olora_equal_hf_peft_bit_for_bit(kind, init, kw) -> None:
    build = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind]
    targets = LLAMA_TARGETS if kind == "llama" else ["c_attn", "c_fc"]
    ours = _pk(build, init, targets, **kw)
    theirs = _hf(build, init, targets, **kw)
    hf_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    for path, host, unit in units(ours):
        hf = hf_layers[path]
        assert torch.equal(host.base_layer.weight, hf.base_layer.weight), path
        assert torch.equal(unit.lora_A, hf.lora_A["default"].weight), path
        assert torch.equal(unit.lora_B, hf.lora_B["default"].weight), path
        if kw.get("use_dora"):
            torch.testing.assert_close(unit.lora_magnitude_vector, hf.lora_magnitude_vector["default"].weight,
                                       rtol=0, atol=1e-6)
    inputs = model_inputs(kind)
    assert_same(run(ours, inputs), run(build(), inputs))  # identity at init


def test_pissa_equals_hf_peft_on_a_bfloat16_base() -> None:
    build = lambda: tiny_llama().to(torch.bfloat16)  # noqa: E731
    ours, theirs = _pk(build, "pissa", ["q_proj"]), _hf(build, "pissa", ["q_proj"])
    ours_q = ours.model.layers[0].self_attn.q_proj
    theirs_q = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert ours_q.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(ours_q.base_layer.weight, theirs_q.base_layer.weight)
    # A float32 adapter on a half base; HF PEFT's A passed through the base's dtype on the way
    # (moved to the base's device and dtype, then cast back to float32): equal to bfloat16's precision.
    assert ours_q.adapters["default"].lora_A.dtype == torch.float32
    torch.testing.assert_close(ours_q.adapters["default"].lora_A, theirs_q.lora_A["default"].weight.float(),
                               rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
def test_base_holds_the_residual_and_the_model_is_unchanged_at_init(init) -> None:
    base = tiny_llama()
    model = _pk(tiny_llama, init, LLAMA_TARGETS, lora_alpha=6)
    for path, host, unit in units(model):
        original = dict(base.named_modules())[path].weight
        assert unit.base_change == "residual"
        assert (host.base_layer.weight - original).abs().max() > 1e-3, path  # the base did change
        torch.testing.assert_close(host.base_layer.weight + unit.scaling * unit.lora_B @ unit.lora_A, original,
                                   rtol=0, atol=1e-5)
        a0, b0 = unit.initial_pair()
        assert torch.equal(a0, unit.lora_A) and torch.equal(b0, unit.lora_B)
    inputs = model_inputs("llama")
    assert_same(run(model, inputs), run(base, inputs))


def test_orthogonal_leaves_the_base_and_the_model_unchanged() -> None:
    base = tiny_gpt2()
    model = _pk(tiny_gpt2, "orthogonal", ["c_attn", "c_fc"], fan_in_fan_out=True, r=6)
    assert all(torch.equal(v, base.state_dict()[k.replace(".base_layer", "")]) for k, v in model.state_dict().items()
               if "base_layer" in k)
    for _, _, unit in units(model):
        assert unit.lora_A.abs().max() > 1e-3 and unit.lora_B.abs().max() > 1e-3
        assert (unit.lora_B @ unit.lora_A).abs().max() < 1e-6
    inputs = model_inputs("gpt2")
    assert_same(run(model, inputs), run(base, inputs))


def test_loftq_base_is_nf4_exact_and_closer_to_the_float_model_than_plain_nf4() -> None:
    base = tiny_llama()
    config = peftkit.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2},
                                target_modules="all-linear", r=8, lora_alpha=8)
    model = peftkit.apply(tiny_llama(), config)
    for path, host, unit in units(model):
        original = dict(base.named_modules())[path].weight
        q = host.base_layer.weight
        assert unit.base_change == "quantized"
        assert torch.equal(lora_init.nf4_roundtrip(q), q), path  # what 4-bit storage keeps exactly
        fitted = q + unit.scaling * unit.lora_B @ unit.lora_A
        assert (original - fitted).norm() < (original - lora_init.nf4_roundtrip(original)).norm(), path
    inputs = model_inputs("llama")
    want = run(base, inputs)
    plain = run(peftkit.quantize(tiny_llama()), inputs)
    assert (run(model, inputs) - want).abs().max() < (plain - want).abs().max()
    # stored in 4 bits, the LoftQ base computes the same
    before = run(model, inputs)
    lora_init.quantize_base(model)
    assert all(peftkit.quant.is_quantized(h.base_layer) for _, h, _ in units(model))
    assert_same(run(model, inputs), before)


def test_embedding_targets_fall_back_to_the_default_init_as_in_hf() -> None:
    targets = ["word_embeddings", "query"]
    with pytest.warns(peftkit.PeftkitWarning, match=r"1 Embedding layer\(s\) .*word_embeddings.* default init"):
        ours = peftkit.apply(tiny_bert(), peftkit.LoraConfig(init_lora_weights="pissa", target_modules=targets, r=4))
    emb = ours.bert.embeddings.word_embeddings
    assert torch.equal(emb.base_layer.weight, tiny_bert().bert.embeddings.word_embeddings.weight)
    assert emb.adapters["default"].lora_embedding_A.abs().max() == 0  # LoRA's default: A = 0, B normal
    assert emb.adapters["default"].base_change is None


# -- refused layers and values ---------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("build, init, targets, fragments", [
    (ConvNet, "pissa", ["fc", "conv"], ["'conv' (Conv2d)", "Linear"]),
    (ConvNet, "orthogonal", ["fc", "conv"], ["'conv' (Conv2d)"]),
    (tiny_gpt2, "olora", ["c_attn"], ["Conv1D", "HF PEFT"]),
    (tiny_gpt2, "loftq", ["c_attn"], ["Conv1D", "HF PEFT"]),
    (lambda: peftkit.quantize(tiny_llama()), "pissa", ["q_proj"], ["4 bits", "float"]),
    (lambda: peftkit.quantize(tiny_llama()), "loftq", ["q_proj"], ["4 bits", "LoftQ quantizes"]),
])
def test_layers_an_init_cannot_start_are_refused_and_nothing_changes(build, init, targets, fragments) -> None:
    model = build()
    before = base_weights(model)
    kw = {"loftq_config": {"loftq_bits": 4}} if init == "loftq" else {}
    with pytest.raises(peftkit.ConfigError) as info:
        peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=init, target_modules=targets, r=4, **kw))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items() if v.is_floating_point())


def test_a_refusal_after_the_units_were_built_puts_the_residual_back() -> None:
    """Another feature of the same config refusing after the PiSSA units were built (a token id
    out of range): the residuals go back into the base, equal to the original up to rounding."""
    model = tiny_llama()
    before = base_weights(model)
    with pytest.raises(peftkit.ConfigError, match="trainable_token_indices"):
        peftkit.apply(model, peftkit.LoraConfig(init_lora_weights="pissa", target_modules=["q_proj"],
                                                trainable_token_indices=[500]))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6, msg=key)


def test_a_rank_above_the_weight_rank_is_refused() -> None:
    with pytest.raises(peftkit.ConfigError, match=r"rank 40: the weight is \(32, 32\), of rank at most 32"):
        peftkit.apply(tiny_llama(), peftkit.LoraConfig(init_lora_weights="olora", target_modules=["q_proj"], r=40))


@pytest.mark.parametrize("kwargs, fragments", [
    ({"init_lora_weights": "pissa_niter_x"}, ["init_lora_weights", "pissa_niter_N", "'pissa_niter_x'"]),
    ({"init_lora_weights": "pissa_niter_-1"}, ["init_lora_weights", "'pissa_niter_-1'"]),
    ({"init_lora_weights": "corda"}, ["init_lora_weights", "CorDA", "not implement"]),
    ({"init_lora_weights": "mica"}, ["init_lora_weights", "MiCA"]),
    ({"init_lora_weights": 1}, ["init_lora_weights", "True, False or 'gaussian'", "found 1"]),
    ({"init_lora_weights": "orthogonal", "r": 5}, ["init_lora_weights", "even", "r=5"]),
    ({"init_lora_weights": "orthogonal", "rank_pattern": {"query": 3}}, ["even", "rank_pattern['query']=3"]),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 3}}, ["loftq_bits", "4 (NF4) or 8", "3"]),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 0}}, ["loftq_iter", "positive", "0"]),
    ({"init_lora_weights": "loftq", "loftq_config": {"bits": 4}}, ["loftq_config", "unknown key 'bits'"]),
    ({"init_lora_weights": "loftq", "loftq_config": [4, 1]}, ["loftq_config", "mapping"]),
    ({"lora_bias": "yes"}, ["lora_bias", "true or false", "'yes'"]),
    ({"lora_bias": True, "init_lora_weights": "pissa"}, ["lora_bias", "True or False", "'pissa'"]),
    ({"lora_bias": True, "use_dora": True}, ["lora_bias", "use_dora"]),
])
def test_bad_values_are_clear_errors(kwargs, fragments) -> None:
    with pytest.raises(peftkit.ConfigError) as info:
        peftkit.LoraConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_loftq_defaults_and_a_stray_loftq_config_as_hf_peft() -> None:
    assert peftkit.LoraConfig(init_lora_weights="loftq").loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    # HF PEFT's LoftQ example writes init_lora_weights=True beside the loftq_config it used: ignored
    with pytest.warns(peftkit.PeftkitWarning, match="loftq_config .* is ignored"):
        config = peftkit.LoraConfig.from_dict({"peft_type": "LORA", "init_lora_weights": True,
                                               "loftq_config": {"loftq_bits": 4, "loftq_iter": 5}})
    assert config.loftq_config == {}


@pytest.mark.parametrize("field, value", [
    ("use_qalora", True), ("corda_config", {"corda_method": "kpm"}), ("lora_ga_config", {"bsz": 2}),
    ("kasa_config", {"x": 1}), ("megatron_config", {"a": 1}), ("init_lora_weights", "lora_ga"),
])
def test_hf_fields_still_unsupported_are_refused_naming_the_field(tmp_path, field, value) -> None:
    peft.LoraConfig(r=4, target_modules=["query"]).save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    data[field] = value
    (tmp_path / CONFIG).write_text(json.dumps(data))
    with pytest.raises(peftkit.AdapterFileError) as info:
        peftkit.read_config(tmp_path)
    assert field in str(info.value) and CONFIG in str(info.value), str(info.value)


def test_adalora_still_refuses_loftq_and_lora_bias() -> None:
    for field, value in (("loftq_config", {"loftq_bits": 4, "loftq_iter": 1}), ("lora_bias", True)):
        with pytest.raises(peftkit.ConfigError, match=field):
            peftkit.AdaLoraConfig.from_dict({"peft_type": "ADALORA", field: value, "total_step": 10})


# -- files both ways --------------------------------------------------------------------------------


CASES = [  # (id, model, init, targets, extra config)
    ("pissa-llama", "llama", "pissa", LLAMA_TARGETS, {}),
    ("pissa-llama-patterns", "llama", "pissa", LLAMA_TARGETS, {"rank_pattern": {"down_proj": 2},
                                                               "alpha_pattern": {"q_proj": 3}}),
    ("pissa-gpt2-conv1d", "gpt2", "pissa", ["c_attn", "c_proj"], {"fan_in_fan_out": True}),
    ("pissa-dora", "llama", "pissa", ["q_proj", "v_proj"], {"use_dora": True}),
    ("pissa-bert-embedding", "bert", "pissa", ["query", "value", "word_embeddings"], {}),
    ("olora-llama", "llama", "olora", LLAMA_TARGETS, {"use_rslora": True}),
    ("olora-bert", "bert", "olora", ["query", "dense"], {}),
    ("orthogonal-gpt2", "gpt2", "orthogonal", ["c_attn"], {"fan_in_fan_out": True}),
    ("orthogonal-llama", "llama", "orthogonal", LLAMA_TARGETS, {}),
]
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", peftkit.PeftkitWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hf_trained_file_loads_in_peftkit_with_equal_outputs(case, tmp_path) -> None:
    _, kind, init, targets, extra = case
    build, inputs = BUILD[kind], model_inputs(kind)
    hf = _hf(build, init, targets, task=TASK[kind], **extra)
    assert perturb_trainable(hf) > 0
    hf.eval()
    want = run(hf, inputs)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["init_lora_weights"] == init
    model = _quiet(peftkit.load, build(), tmp_path)
    assert_same(run(model, inputs), want, run(build(), inputs))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_peftkit_trained_file_loads_in_hf_with_equal_outputs(case, tmp_path) -> None:
    _, kind, init, targets, extra = case
    build, inputs = BUILD[kind], model_inputs(kind)
    model = _quiet(_pk, build, init, targets, **extra)
    assert perturb_trainable(model) > 0
    model.eval()
    want = run(model, inputs)
    peftkit.save(model, tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    assert data["init_lora_weights"] == init and data["r"] == 4
    hf = hf_from_pretrained(build(), tmp_path)
    assert_same(run(hf, inputs), want, run(build(), inputs))
    # and back into peftkit, on a fresh base
    assert_same(run(_quiet(peftkit.load, build(), tmp_path), inputs), want)


def test_loftq_file_reloads_on_a_fresh_float_base(tmp_path) -> None:
    """HF PEFT's LoftQ runs on CUDA/XPU only, so both directions with HF are a GPU check
    (docs/lora_init.md); here: the file's fields as HF writes them, and the reload in peftkit."""
    inputs = model_inputs("llama")
    config = peftkit.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 2}, target_modules="all-linear",
                                r=4, lora_alpha=4)
    model = peftkit.apply(tiny_llama(), config)
    perturb_trainable(model)
    model.eval()
    want = run(model, inputs)
    peftkit.save(model, tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    assert data["init_lora_weights"] == "loftq" and data["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    hf_config = peft.LoraConfig.from_pretrained(tmp_path)
    assert hf_config.init_lora_weights == "loftq" and hf_config.loftq_config == data["loftq_config"]
    assert_same(run(peftkit.load(tiny_llama(), tmp_path), inputs), want, run(tiny_llama(), inputs))
    # the CLI's QLoRA path: the base stored in 4 bits after loading computes the same (every
    # linear layer is adapted here, so nothing else is quantized)
    again = lora_init.quantize_base(peftkit.load(tiny_llama(), tmp_path))
    assert_same(run(again, inputs), want)
    with pytest.raises(peftkit.ConfigError, match="plain-LoRA form"):
        peftkit.save(model, tmp_path / "plain", plain_lora=True)


@pytest.fixture
def hf_loftq_on_cpu(monkeypatch):
    """HF PEFT's own ``loftq_init`` with its compute device (CUDA/XPU, hard-coded) set to the CPU:
    HF's LoftQ, run here so that it can be compared (the GPU-only part is the device move)."""
    import inspect

    from peft.utils import loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert source.count(line) == 1, "HF PEFT's loftq_init changed: update this fixture"
    namespace = dict(vars(loftq_utils))
    exec(compile(source.replace(line, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"), namespace)
    monkeypatch.setattr("peft.tuners.lora.layer.loftq_init", namespace["loftq_init"])
    return namespace["loftq_init"]


@pytest.mark.parametrize("iterations", [1, 2])
def test_loftq_equals_hf_peft_loftq(hf_loftq_on_cpu, iterations) -> None:
    w, r = matrix(32, 64, seed=7), 4
    q_hf, a_hf, b_hf = hf_loftq_on_cpu(w, num_bits=4, reduced_rank=r, num_iter=iterations)
    a, b, q = lora_init.loftq(w, r, 1.0, bits=4, iterations=iterations)  # HF's A = R, B = L: scaling 1
    assert torch.equal(q, q_hf)
    torch.testing.assert_close(a, a_hf, rtol=0, atol=1e-6)
    torch.testing.assert_close(b, b_hf, rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha", [4, 8])
def test_loftq_files_both_ways_with_hf_peft(hf_loftq_on_cpu, alpha, tmp_path) -> None:
    inputs = model_inputs("llama")
    kw = dict(r=4, lora_alpha=alpha, loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    hf = _hf(tiny_llama, "loftq", LLAMA_TARGETS, **kw)
    ours = _pk(tiny_llama, "loftq", LLAMA_TARGETS, **kw)
    hf_layers = {n.removeprefix("base_model.model."): m for n, m in hf.named_modules() if hasattr(m, "lora_A")}
    for path, host, unit in units(ours):
        assert torch.equal(host.base_layer.weight, hf_layers[path].base_layer.weight), path  # the same base
    # HF -> peftkit
    perturb_trainable(hf)
    hf.eval()
    hf.save_pretrained(tmp_path / "hf")
    assert_same(run(peftkit.load(tiny_llama(), tmp_path / "hf"), inputs), run(hf, inputs), run(tiny_llama(), inputs))
    # peftkit -> HF
    perturb_trainable(ours)
    ours.eval()
    peftkit.save(ours, tmp_path / "pk")
    assert_same(run(hf_from_pretrained(tiny_llama(), tmp_path / "pk"), inputs), run(ours, inputs),
                run(tiny_llama(), inputs))


def test_a_refused_file_leaves_a_pissa_base_exactly_as_it_was(tmp_path) -> None:
    model = _pk(tiny_llama, "pissa", LLAMA_TARGETS)
    peftkit.save(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = next(k for k in tensors if k.endswith("down_proj.lora_B.weight"))
    del tensors[key]
    save_file(tensors, tmp_path / WEIGHTS)
    fresh = tiny_llama()
    before = base_weights(fresh)
    with pytest.raises(peftkit.AdapterFileError, match=key):
        peftkit.load(fresh, tmp_path)
    after = fresh.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# -- pissa_niter: not reproducible, so converted by default ------------------------------------------


def test_pissa_niter_is_saved_converted_and_loads_anywhere(tmp_path) -> None:
    inputs = model_inputs("llama")
    model = _pk(tiny_llama, "pissa_niter_2", LLAMA_TARGETS)
    perturb_trainable(model)
    model.eval()
    want = run(model, inputs)
    peftkit.save(model, tmp_path / "default")
    data = json.loads((tmp_path / "default" / CONFIG).read_text())
    assert data["init_lora_weights"] is True and data["r"] == 8 and data["lora_alpha"] == 16
    assert_same(run(hf_from_pretrained(tiny_llama(), tmp_path / "default"), inputs), want, run(tiny_llama(), inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.PeftkitWarning)  # a converted file loads without a warning
        assert_same(run(peftkit.load(tiny_llama(), tmp_path / "default"), inputs), want)

    peftkit.save(model, tmp_path / "raw", plain_lora=False)  # asked for: as trained
    assert json.loads((tmp_path / "raw" / CONFIG).read_text())["init_lora_weights"] == "pissa_niter_2"
    fresh = tiny_llama()
    torch.manual_seed(1)  # another draw than the one the adapter was initialised with
    with pytest.warns(peftkit.PeftkitWarning, match=r"pissa_niter_2.*unconverted.*another residual"):
        reloaded = peftkit.load(fresh, tmp_path / "raw")
    assert (run(reloaded, inputs) - want).abs().max() > 1e-4  # what the warning says


def test_hf_pissa_niter_file_warns_in_peftkit(tmp_path) -> None:
    _hf(tiny_llama, "pissa_niter_2", ["q_proj"]).save_pretrained(tmp_path)
    with pytest.warns(peftkit.PeftkitWarning, match="unconverted"):
        peftkit.load(tiny_llama(), tmp_path)


# -- conversion to a plain LoRA ------------------------------------------------------------------------


@pytest.mark.parametrize("init, extra", [
    ("pissa", {}),
    ("pissa", {"use_rslora": True}),
    ("pissa", {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}}),
    ("olora", {"use_dora": True}),
])
def test_converted_file_is_a_plain_lora_on_the_untouched_base(init, extra, tmp_path) -> None:
    inputs = model_inputs("llama")
    model = _pk(tiny_llama, init, LLAMA_TARGETS, **extra)
    perturb_trainable(model)
    model.eval()
    want = run(model, inputs)
    peftkit.save(model, tmp_path, plain_lora=True)
    data = json.loads((tmp_path / CONFIG).read_text())
    assert data["init_lora_weights"] is True and data["r"] == 8
    assert data["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if extra.get("use_rslora") else 2))
    assert data["rank_pattern"] == {k: 2 * v for k, v in extra.get("rank_pattern", {}).items()}
    assert data["alpha_pattern"] == {k: 2 * v for k, v in extra.get("alpha_pattern", {}).items()}
    tensors = load_file(tmp_path / WEIGHTS)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 32)
    hf = hf_from_pretrained(tiny_llama(), tmp_path)  # the untouched base: HF runs no init
    assert_same(run(hf, inputs), want, run(tiny_llama(), inputs), atol=2e-5)
    # beside another adapter in peftkit, switchable
    ours = peftkit.load(tiny_llama(), tmp_path, name="converted")
    assert_same(run(ours, inputs), want, atol=2e-5)
    with peftkit.disabled(ours):
        assert_same(run(ours, inputs), run(tiny_llama(), inputs))  # the base is the untouched one


def test_peftkit_conversion_equals_hf_peft_conversion(tmp_path) -> None:
    """HF PEFT's own conversion (save the initial adapter, train, ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)``) and peftkit's give the same file."""
    hf = _hf(tiny_llama, "pissa", LLAMA_TARGETS)
    hf.peft_config["default"].init_lora_weights = True  # HF's recipe: the initial adapter as a plain LoRA
    hf.save_pretrained(tmp_path / "init")
    hf.peft_config["default"].init_lora_weights = "pissa"
    perturb_trainable(hf)
    hf.save_pretrained(tmp_path / "trained")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path / "hf-converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours = peftkit.load(tiny_llama(), tmp_path / "trained")
    peftkit.save(ours, tmp_path / "pk-converted", plain_lora=True)
    theirs, mine = load_file(tmp_path / "hf-converted" / WEIGHTS), load_file(tmp_path / "pk-converted" / WEIGHTS)
    assert theirs.keys() == mine.keys()
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)
    hf_data = json.loads((tmp_path / "hf-converted" / CONFIG).read_text())
    pk_data = json.loads((tmp_path / "pk-converted" / CONFIG).read_text())
    for field in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert pk_data[field] == hf_data[field], field


def test_conversion_refusals_and_no_ops(tmp_path) -> None:
    model = _pk(tiny_llama, "pissa", LLAMA_TARGETS, use_rslora=True, rank_pattern={"q_proj": 2})
    with pytest.raises(peftkit.ConfigError, match="use_rslora and rank_pattern"):
        peftkit.save(model, tmp_path / "x", plain_lora=True)
    plain = _pk(tiny_llama, "gaussian", LLAMA_TARGETS)
    peftkit.save(plain, tmp_path / "plain", plain_lora=True)  # a plain LoRA already: as it is
    assert json.loads((tmp_path / "plain" / CONFIG).read_text())["r"] == 4
    with pytest.raises(peftkit.ConfigError, match="plain_lora"):
        peftkit.save(plain, tmp_path / "y", plain_lora="yes")


# -- merging, unmerging, unload, delete with a modified base ----------------------------------------


def test_merge_unmerge_unload_with_a_pissa_base() -> None:
    inputs = model_inputs("llama")
    base = tiny_llama()
    base_out = run(base, inputs)
    model = _pk(tiny_llama, "pissa", LLAMA_TARGETS)
    perturb_trainable(model)
    model.eval()
    trained = run(model, inputs)
    peftkit.merge(model, probe=None)
    assert_same(run(model, inputs), trained, base_out)
    peftkit.unmerge(model)
    assert_same(run(model, inputs), trained)
    # unload(merge=False): the residual goes back into the base: the original model (up to rounding)
    peftkit.unload(model, merge=False)
    assert_same(run(model, inputs), base_out)
    for (name, w), (_, w0) in zip(model.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(w, w0, rtol=0, atol=1e-6, msg=name)
    # unload(merge=True): the trained function, in plain weights
    merged = _pk(tiny_llama, "pissa", LLAMA_TARGETS)
    perturb_trainable(merged)
    peftkit.unload(merged.eval(), merge=True)
    assert_same(run(merged, inputs), trained)


def test_delete_restores_the_base_and_hf_unload_keeps_the_residual() -> None:
    inputs = model_inputs("llama")
    base_out = run(tiny_llama(), inputs)
    model = _pk(tiny_llama, "olora", LLAMA_TARGETS)
    peftkit.apply(model, peftkit.LoraConfig(target_modules=["k_proj"], init_lora_weights=False), name="other")
    peftkit.delete(model, "default")
    with peftkit.disabled(model):
        assert_same(run(model, inputs), base_out)
    # HF PEFT's unload gives back the residual base (its PiSSA recipe saves that as the base)
    hf = _hf(tiny_llama, "olora", LLAMA_TARGETS).unload()
    assert (run(hf, inputs) - base_out).abs().max() > 1e-3


def test_olora_on_a_4bit_base_as_hf_peft_and_restored_exactly() -> None:
    inputs = model_inputs("llama")
    quantized = lambda: peftkit.quantize(tiny_llama())  # noqa: E731
    reference = quantized()
    ours = _pk(quantized, "olora", ["q_proj", "v_proj"])
    theirs = _hf(quantized, "olora", ["q_proj", "v_proj"])
    q_ours = ours.model.layers[0].self_attn.q_proj
    q_theirs = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert peftkit.quant.is_quantized(q_ours.base_layer)
    assert torch.equal(q_ours.base_layer.weight.data, q_theirs.base_layer.weight.data)  # the same 4-bit codes
    assert torch.equal(q_ours.adapters["default"].lora_A, q_theirs.lora_A["default"].weight)
    assert_same(run(ours.eval(), inputs), run(theirs.eval(), inputs))
    peftkit.unload(ours)
    assert_same(run(ours, inputs), run(reference, inputs), atol=0)  # the original 4-bit weights back


def test_several_adapters_with_a_modified_base_warn() -> None:
    model = _pk(tiny_llama, "gaussian", ["q_proj"])
    with pytest.warns(peftkit.PeftkitWarning, match="changes the base weights"):
        peftkit.apply(model, peftkit.LoraConfig(init_lora_weights="pissa", target_modules=["v_proj"]), name="p")


# -- lora_bias --------------------------------------------------------------------------------------------


BIAS_CASES = [
    ("bert", ["query", "value"], {}),
    ("gpt2", ["c_attn", "c_fc"], {"fan_in_fan_out": True}),
]


def _conv_inputs():
    return {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("kind, targets, extra", BIAS_CASES + [("conv", ["conv", "fc"], {})])
def test_lora_bias_both_ways_and_merged_as_hf(kind, targets, extra, tmp_path) -> None:
    build = {"bert": tiny_bert, "gpt2": tiny_gpt2, "conv": ConvNet}[kind]
    inputs = _conv_inputs() if kind == "conv" else model_inputs(kind)
    task = None if kind == "conv" else TASK[kind]
    # peftkit -> HF
    model = peftkit.apply(build(), peftkit.LoraConfig(lora_bias=True, target_modules=targets, r=4, **extra))
    assert perturb_trainable(model) > 0
    model.eval()
    want = run(model, inputs)
    peftkit.save(model, tmp_path / "pk")
    tensors = load_file(tmp_path / "pk" / WEIGHTS)
    biases = [k for k in tensors if k.endswith("lora_B.bias")]
    assert len(biases) == len([n for n, _ in build().named_modules() if n.split(".")[-1] in targets])
    hf = hf_from_pretrained(build(), tmp_path / "pk")
    assert_same(run(hf, inputs), want, run(build(), inputs))
    # merged: B's scaled bias is added to the base bias, as HF PEFT's merge_and_unload does
    merged_hf = hf.merge_and_unload()
    peftkit.unload(model, merge=True)
    assert_same(run(model, inputs), want)
    ours, theirs = model.state_dict(), merged_hf.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    # HF -> peftkit
    hf = peft.get_peft_model(build(), peft.LoraConfig(lora_bias=True, target_modules=targets, r=4, task_type=task,
                                                      **extra))
    perturb_trainable(hf)
    hf.eval()
    hf.save_pretrained(tmp_path / "hf")
    assert_same(run(peftkit.load(build(), tmp_path / "hf"), inputs), run(hf, inputs), run(build(), inputs))


def test_lora_bias_starts_at_zero_and_random_with_init_false() -> None:
    inputs = model_inputs("bert")
    model = peftkit.apply(tiny_bert(), peftkit.LoraConfig(lora_bias=True, target_modules=["query"], r=4))
    unit = model.bert.encoder.layer[0].attention.self.query.adapters["default"]
    assert unit.lora_B_bias.requires_grad and torch.equal(unit.lora_B_bias, torch.zeros(32))
    assert_same(run(model, inputs), run(tiny_bert(), inputs))
    noisy = peftkit.apply(tiny_bert(), peftkit.LoraConfig(lora_bias=True, init_lora_weights=False,
                                                          target_modules=["query"], r=4))
    bias = noisy.bert.encoder.layer[0].attention.self.query.adapters["default"].lora_B_bias
    assert 0 < bias.abs().max() <= 0.5  # uniform(±1/√r), as torch's nn.Linear(r, out) that HF PEFT uses


def test_lora_bias_without_a_base_bias_warns_and_cannot_merge() -> None:
    with pytest.warns(peftkit.PeftkitWarning, match=r"lora_bias=True: 4 adapted layer\(s\).*no bias"):
        model = peftkit.apply(tiny_llama(), peftkit.LoraConfig(lora_bias=True, target_modules=["q_proj", "v_proj"]))
    before = base_weights(model)
    with pytest.raises(peftkit.ModelError, match="cannot be merged: lora_bias=True and the base layer has no bias"):
        peftkit.merge(model, probe=None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_lora_bias_on_an_embedding_is_refused() -> None:
    with pytest.raises(peftkit.ConfigError, match=r"lora_bias.*'bert.embeddings.word_embeddings' \(Embedding\)"):
        peftkit.apply(tiny_bert(), peftkit.LoraConfig(lora_bias=True, target_modules=["word_embeddings"]))


def test_lora_bias_in_a_mixed_batch() -> None:
    model = peftkit.apply(tiny_bert(), peftkit.LoraConfig(lora_bias=True, target_modules=["query"], r=4))
    peftkit.apply(model, peftkit.LoraConfig(target_modules=["query"], init_lora_weights=False, r=2), name="b")
    perturb_trainable(model)  # only "b" trains now; give "default" a bias too
    with torch.no_grad():
        for _, _, unit in units(model):
            unit.lora_B_bias.add_(0.3)
    model.eval()
    inputs = model_inputs("bert")
    out = model(**inputs, adapter_names=["default", "b"]).logits
    for row, name in enumerate(["default", "b"]):
        peftkit.set_active(model, name)
        assert_same(out[row:row + 1], run(model, {k: v[row:row + 1] for k, v in inputs.items()}))


# -- the command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from cli_helpers import save_tiny_bert, write_topic_files

    root = tmp_path_factory.mktemp("cli-init")
    return root, save_tiny_bert(root / "tiny-bert"), write_topic_files(root)


@pytest.mark.parametrize("method, init, field", [
    ("lora", "pissa", "pissa"),
    ("dora", "olora", "olora"),
    ("qlora", "loftq", "loftq"),  # LoftQ on the float base, then the base stored in 4 bits
    ("qlora", "pissa", "pissa"),  # the residual quantized (QPiSSA), also when evaluated again
    ("qlora", "olora", "olora"),  # OLoRA over the 4-bit base, as HF PEFT does it
])
def test_cli_init_trains_and_evaluates_again(cli_files, method, init, field) -> None:
    from cli_helpers import invoke

    root, model, (train, evaluation) = cli_files
    out = root / f"{method}-{init}"
    result = invoke("train", "--method", method, "--init", init, "--model", model, "--data", train,
                    "--eval-data", evaluation, "--max-steps", 2, "--batch-size", 4, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "adapter" / CONFIG).read_text())
    assert data["init_lora_weights"] == field
    summary = json.loads((out / "summary.json").read_text())
    if method == "qlora":
        assert data["loftq_config"] == ({"loftq_bits": 4, "loftq_iter": 1} if init == "loftq" else {})
        assert summary["base_bytes"]["quantized_bytes"] > 0
    got = json.loads(invoke("eval", "--adapter", out, "-q").stdout)  # the init runs again on the fresh base
    assert got["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)


@pytest.mark.parametrize("args, fragments", [
    (["--init", "loftq"], ["--init loftq", "--method qlora"]),
    (["--init", "pissa_niter_x"], ["--init", "pissa_niter_x", "pissa_niter_N"]),
    (["--init", "pissa", "--method", "ia3"], ["--init", "does not apply to --method ia3"]),
    (["--init", "orthogonal", "--r", "3"], ["orthogonal", "even", "r=3"]),
])
def test_cli_init_errors_are_one_clear_line(cli_files, args, fragments) -> None:
    from cli_helpers import assert_clean_error, invoke

    root, model, (train, _) = cli_files
    assert_clean_error(invoke("train", "--model", model, "--data", train, "--max-steps", 1,
                              "--out", root / "never", *args), *fragments)


def test_hotswap_refuses_a_modified_base_or_a_lora_bias(tmp_path) -> None:
    pissa = _pk(tiny_llama, "pissa", ["q_proj"])
    peftkit.save(pissa, tmp_path / "pissa")
    biased = peftkit.apply(tiny_llama(), peftkit.LoraConfig(target_modules=["o_proj"], lora_bias=True))
    peftkit.save(biased, tmp_path / "biased")
    plain = _pk(tiny_llama, True, ["q_proj"])
    for directory, fragment in ((tmp_path / "pissa", "changes the base weights"), (tmp_path / "biased", "lora_bias")):
        with pytest.raises(peftkit.AdapterFileError, match=fragment):
            peftkit.hotswap(plain, directory)
    converted = tmp_path / "converted"
    peftkit.save(pissa, converted, plain_lora=True)
    assert json.loads((converted / CONFIG).read_text())["init_lora_weights"] is True

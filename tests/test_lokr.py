"""LoKr (``methods/lokr.py``) beyond the conformance suite.

- Files both ways with HF PEFT (random non-zero factors: every trainable parameter is moved
  after init), over Linear / Conv2d (grouped, 1x1) / Conv1d layers, full and low-rank factors,
  ``decompose_both``, ``decompose_factor`` (-1, a divisor, a non-divisor), the CP form
  (``use_effective_conv2d``), rank/alpha patterns and ``modules_to_save``; HF's merge of our file.
- The files themselves: tensor keys, shapes, dtypes and config fields as HF PEFT writes them.
- The Linear forward uses the Kronecker identity and equals ``F.linear`` with ΔW built.
- Composition with LoRA against a hand-computed model; dropouts (train mode only, as HF).
- Errors: bad config values, unsupported layers (GPT-2's Conv1D among them).
- ``peftkit train --method lokr`` writes an adapter that HF PEFT loads.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import peftkit
from peftkit import registry
from peftkit.layer import AdapterLayer

from interop_helpers import assert_same, hf_from_pretrained, perturb_trainable, run
from conftest import model_inputs, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
LoKrConfig = registry.get("LOKR").config_cls
WEIGHTS = "adapter_model.safetensors"
ATOL = 1e-5


# -- a small non-transformers model with every layer type LoKr adapts --------------------------


class ConvNet(nn.Module):
    """Conv2d (3x3, grouped 3x3 with stride, 1x1) -> Conv1d (k=3, k=1) -> Linear -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)  # (B, 16, 8, 8)
        self.grouped = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2)  # (B, 16, 4, 4)
        self.point = nn.Conv2d(16, 8, 1)  # (B, 8, 4, 4) -> (B, 8, 16)
        self.seq = nn.Conv1d(8, 16, 3, padding=1)  # (B, 16, 16)
        self.seq1 = nn.Conv1d(16, 8, 1)  # (B, 8, 16) -> (B, 128)
        self.fc = nn.Linear(128, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.grouped(torch.relu(self.conv(x))))
        h = self.point(h).flatten(2)
        h = self.seq1(torch.relu(self.seq(h))).flatten(1)
        return self.head(torch.relu(self.fc(h)))


def convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


BUILD = {"bert": tiny_bert, "llama": tiny_llama, "convnet": convnet}
HF_TASK = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM", "convnet": None}
CONVS = ["conv", "grouped", "point", "seq", "seq1", "fc"]


def inputs_for(kind: str) -> dict:
    if kind == "convnet":
        return {"x": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))}
    return model_inputs(kind)


def hf_config(kind: str, **kwargs):
    # A copy: HF PEFT extends the modules_to_save list it is given in place.
    return peft.LoKrConfig(task_type=HF_TASK[kind], **copy.deepcopy(kwargs))


@pytest.fixture(autouse=True)
def hf_cp_strides(monkeypatch):
    """HF PEFT 0.21 under torch 2.13: ``torch.kron`` fails on the CP core einsum gives a Conv1d
    (its trailing size-1 dimension has an odd stride), so HF cannot run a Conv1d with
    ``use_effective_conv2d`` at all. The same values with standard strides let its own code run;
    nothing it computes changes."""
    from peft.tuners.lokr import layer

    original = layer.make_weight_cp
    monkeypatch.setattr(layer, "make_weight_cp",
                        lambda *a: original(*a).clone(memory_format=torch.contiguous_format))


def units(model: nn.Module, name: str = "default") -> dict:
    return {n: m.adapters[name] for n, m in model.named_modules() if isinstance(m, AdapterLayer) and name in m.adapters}


# -- the case matrix, shared by both directions ------------------------------------------------


@dataclass
class Case:
    id: str
    kind: str
    kwargs: dict = field(default_factory=dict)
    # What the case must exercise, checked on the built units (so a case cannot silently
    # stop covering what its name says): a subset of full_w1, lowrank_w1, full_w2, lowrank_w2, cp.
    covers: tuple[str, ...] = ()


CASES = [
    # Default targets (query, value), classifier head in modules_to_save; r=8 >= 8/2: W2 in full.
    Case("bert-default", "bert", {}, ("full_w1", "full_w2")),
    Case("bert-lowrank-decompose-both", "bert",
         dict(target_modules=["query", "key", "intermediate.dense", "output.dense"], r=2, decompose_both=True),
         ("full_w1", "lowrank_w1", "lowrank_w2")),
    Case("bert-factor-divisor", "bert", dict(target_modules=["query", "value", "intermediate.dense"], r=4,
                                             decompose_factor=2), ("full_w1", "lowrank_w2")),
    Case("bert-factor-non-divisor", "bert", dict(target_modules=["query", "intermediate.dense"], r=16,
                                                 decompose_factor=3, decompose_both=True), ("full_w1", "full_w2")),
    Case("bert-rank-alpha-pattern", "bert",
         dict(target_modules=["query", "key", "value"], r=2, alpha=4,
              rank_pattern={"query": 8, "layer.1.attention.self.value": 4}, alpha_pattern={"key": 5}),
         ("full_w2", "lowrank_w2")),
    Case("bert-modules-to-save", "bert", dict(target_modules=["query"], modules_to_save=["pooler.dense"], r=2)),
    Case("llama-default", "llama", {}),
    Case("llama-all-linear", "llama", dict(target_modules="all-linear", r=1, alpha=3, decompose_both=True),
         ("lowrank_w1", "lowrank_w2")),
    Case("convnet-full", "convnet", dict(target_modules=CONVS, r=8, modules_to_save=["head"]), ("full_w2",)),
    Case("convnet-lowrank", "convnet", dict(target_modules=CONVS, r=1), ("lowrank_w2",)),
    Case("convnet-effective-conv2d", "convnet", dict(target_modules=CONVS, r=1, use_effective_conv2d=True),
         ("cp", "lowrank_w2")),
    Case("convnet-effective-both-factor", "convnet",
         dict(target_modules=CONVS, r=1, alpha=2, use_effective_conv2d=True, decompose_both=True, decompose_factor=4),
         ("cp", "lowrank_w1")),
    Case("conv1d-only", "convnet", dict(target_modules=["seq", "seq1"], r=1, use_effective_conv2d=True),
         ("cp", "lowrank_w2")),
]
CASE_IDS = [c.id for c in CASES]


def _check_covers(model: nn.Module, case: Case) -> None:
    seen = set()
    for unit in units(model).values():
        seen.add("full_w1" if unit.full_w1 else "lowrank_w1")
        seen.add("full_w2" if unit.full_w2 else "cp" if unit.cp else "lowrank_w2")
    assert set(case.covers) <= seen, (case.id, sorted(seen))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hf_adapter_loads_in_peftkit(case: Case, tmp_path) -> None:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    base_out = run(build(), inputs)
    hf = peft.get_peft_model(build(), hf_config(case.kind, init_weights=False, **case.kwargs))
    assert perturb_trainable(hf) > 0
    hf.eval()
    want = run(hf, inputs)
    hf.save_pretrained(tmp_path)

    model = peftkit.load(build(), tmp_path)
    _check_covers(model, case)
    assert_same(run(model, inputs), want, base_out)


def _peftkit_adapted(case: Case, directory):
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    model = peftkit.apply(build(), LoKrConfig(init_weights=False, **case.kwargs))
    _check_covers(model, case)
    assert perturb_trainable(model) > 0
    model.eval()
    peftkit.save(model, directory)
    return model, run(model, inputs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peftkit_adapter_loads_and_merges_in_hf(case: Case, tmp_path) -> None:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    base_out = run(build(), inputs)
    model, want = _peftkit_adapted(case, tmp_path)

    hf = hf_from_pretrained(build(), tmp_path)
    assert hf.peft_config["default"].peft_type == peft.PeftType.LOKR
    theirs = peft.get_peft_model_state_dict(hf)
    ours = load_file(tmp_path / WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key
    assert_same(run(hf, inputs), want, base_out)

    # HF's merge of our file computes what our unmerged adapter does, and gives our merged weights.
    merged = hf.merge_and_unload().eval()
    assert not any("lokr" in n for n, _ in merged.named_parameters())
    assert_same(run(merged, inputs), want)
    peftkit.unload(model, merge=True)
    mine, hfs = model.state_dict(), merged.state_dict()
    assert mine.keys() == hfs.keys()
    for key in mine:
        assert torch.allclose(mine[key], hfs[key], atol=1e-6), key


# -- the files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.id in (
    "bert-lowrank-decompose-both", "bert-rank-alpha-pattern", "bert-modules-to-save", "llama-all-linear",
    "convnet-effective-both-factor", "convnet-full")], ids=lambda c: c.id)
def test_file_keys_shapes_and_config_fields_match_hf(case: Case, tmp_path) -> None:
    build = BUILD[case.kind]
    kwargs = dict(case.kwargs, rank_dropout=0.25, module_dropout=0.1, rank_dropout_scale=True)
    peftkit.save(peftkit.apply(build(), LoKrConfig(**kwargs)), tmp_path / "pk")
    peft.get_peft_model(build(), hf_config(case.kind, **kwargs)).save_pretrained(tmp_path / "hf")

    ours, theirs = load_file(tmp_path / "pk" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert (ours[key].shape, ours[key].dtype) == (theirs[key].shape, theirs[key].dtype), key
        # The same factor starts at zero (HF's init: W1, or W1_a, is zero).
        assert bool((ours[key] == 0).all()) == bool((theirs[key] == 0).all()), key

    mine = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    hfs = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert set(hfs) - set(mine) <= {"peft_version", "auto_mapping"}
    assert set(mine) <= set(hfs)
    for name in set(mine) - {"target_modules", "modules_to_save"}:
        assert mine[name] == hfs[name], name
    assert set(mine["modules_to_save"] or []) == set(hfs["modules_to_save"] or [])
    # We write the exact names adapted; HF writes the selector. Both select the same modules.
    adapted = sorted({k[len("base_model.model."):].rsplit(".", 1)[0] for k in theirs if ".lokr_" in k})
    assert mine["target_modules"] == adapted
    # And HF reads our file into its own config class.
    hf_read = peft.LoKrConfig.from_pretrained(tmp_path / "pk")
    assert (hf_read.r, hf_read.alpha, hf_read.decompose_both) == (kwargs.get("r", 8), kwargs.get("alpha", 8),
                                                                 kwargs.get("decompose_both", False))


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_identity_at_init_and_which_factor_is_zero(init, tmp_path) -> None:
    """True (HF's default) zeroes W1 (or W1_a), "lycoris" W2 (or W2_b); both start at the base."""
    inputs = model_inputs("llama")
    kwargs = dict(target_modules=["q_proj", "down_proj"], r=2, decompose_both=True, init_weights=init)
    model = peftkit.apply(tiny_llama(), LoKrConfig(**kwargs))
    torch.testing.assert_close(run(model, inputs), run(tiny_llama(), inputs), rtol=0, atol=0)
    peftkit.save(model, tmp_path / "pk")
    peft.get_peft_model(tiny_llama(), hf_config("llama", **kwargs)).save_pretrained(tmp_path / "hf")
    zeros = {d: sorted(k for k, t in load_file(tmp_path / d / WEIGHTS).items() if not t.any()) for d in ("pk", "hf")}
    assert zeros["pk"] == zeros["hf"] and zeros["pk"]
    expected = ("lokr_w1", "lokr_w1_a") if init is True else ("lokr_w2", "lokr_w2_b")
    assert all(k.rsplit(".", 1)[1] in expected for k in zeros["pk"])


# -- the forward ------------------------------------------------------------------------------


class TwoLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)
        self.out = nn.Linear(n_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x)))


def _hand_kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(W1 ⊗ W2)[i·b + j, p·d + q] = W1[i, p] · W2[j, q], written out."""
    (a, c), (b, d) = w1.shape, w2.shape
    return (w1[:, None, :, None] * w2[None, :, None, :]).reshape(a * b, c * d)


def _raw_lokr_delta(unit) -> torch.Tensor:
    """ΔW of a Linear LoKr unit from its file tensors, by hand."""
    t = unit.file_tensors()
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return _hand_kron(w1, w2) * (unit.alpha / unit.r)


@pytest.mark.parametrize("n_in,n_out,kwargs", [
    (32, 48, dict(r=2)),  # W1 full, W2 low-rank
    (32, 48, dict(r=16)),  # both full
    (24, 36, dict(r=1, decompose_both=True)),  # both low-rank
    (64, 32, dict(r=2, decompose_factor=4, decompose_both=True)),
    (7, 13, dict(r=2)),  # primes: (1, 7) and (1, 13)
])
def test_kronecker_identity_forward_equals_the_materialised_delta(n_in, n_out, kwargs, monkeypatch) -> None:
    torch.manual_seed(0)
    net = TwoLinear(n_in, n_out).double()
    peftkit.apply(net, LoKrConfig(target_modules=["fc"], init_weights=False, alpha=3, **kwargs))
    host = net.fc
    unit = host.adapters["default"]
    perturb_trainable(net)
    x = torch.randn(3, 5, n_in, dtype=torch.float64)
    with torch.no_grad():
        delta = unit.delta_weight()
        assert delta.shape == host.base_layer.weight.shape
        torch.testing.assert_close(delta, _raw_lokr_delta(unit), rtol=0, atol=1e-12)
        want = host.base_layer(x) + F.linear(x, delta)
        through_delta = host(x) if not unit.kronecker_pays(15) else None  # the form small layers take
        # The identity's forward builds neither ΔW nor any Kronecker product.
        monkeypatch.setattr(type(unit), "kronecker_pays", lambda self, rows: True)
        monkeypatch.setattr(unit, "delta_weight", lambda: pytest.fail("the Linear forward built ΔW"))
        monkeypatch.setattr(torch, "kron", lambda *a: pytest.fail("the Linear forward called torch.kron"))
        got = host(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if through_delta is not None:
        torch.testing.assert_close(through_delta, want, rtol=0, atol=1e-12)
    assert (got - host.base_layer(x)).abs().max() > 1e-3


def test_the_forward_takes_the_form_that_keeps_less_for_backward() -> None:
    layer = peftkit.apply(TwoLinear(384, 384), LoKrConfig(target_modules=["fc"])).fc.adapters["default"]
    assert not layer.kronecker_pays(2048)  # MiniLM-sized layer, a long batch: ΔW (147k) is smaller
    big = peftkit.apply(TwoLinear(4096, 4096), LoKrConfig(target_modules=["fc"])).fc.adapters["default"]
    assert big.kronecker_pays(512)  # 4096 x 4096, 512 rows: the identity keeps 6.3M numbers, ΔW 16.8M
    assert not big.kronecker_pays(4096)


def test_bfloat16_base_gets_float32_factors_like_hf(tmp_path) -> None:
    kwargs = dict(target_modules=["query", "value"], r=2)
    model = peftkit.apply(tiny_bert().to(torch.bfloat16), LoKrConfig(**kwargs))
    peftkit.save(model, tmp_path / "pk")
    peft.get_peft_model(tiny_bert().to(torch.bfloat16), hf_config("bert", **kwargs)).save_pretrained(tmp_path / "hf")
    ours, theirs = load_file(tmp_path / "pk" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert {k: t.dtype for k, t in ours.items()} == {k: t.dtype for k, t in theirs.items()}
    assert {t.dtype for k, t in ours.items() if ".lokr_" in k} == {torch.float32}
    out = model(**model_inputs("bert")).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_conv_padding_mode_is_applied_like_merging() -> None:
    """A reflect-padded conv: the unmerged update uses the base's padding mode, so merged equals unmerged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"))
    peftkit.apply(net, LoKrConfig(target_modules=["0"], init_weights=False, r=1))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        unmerged = net(x)
        peftkit.merge(net)
        torch.testing.assert_close(net(x), unmerged, rtol=0, atol=1e-5)


# -- composition with LoRA ------------------------------------------------------------------------


def test_lokr_and_lora_compose_on_the_same_and_on_different_layers() -> None:
    inputs = model_inputs("llama")
    model = tiny_llama()
    peftkit.apply(model, LoKrConfig(target_modules=["q_proj", "v_proj"], r=2, alpha=4, init_weights=False), name="k")
    peftkit.apply(model, peftkit.LoraConfig(target_modules=["q_proj", "o_proj"], r=2, lora_alpha=6,
                                            init_lora_weights=False), name="l")
    perturb_trainable(model, seed=1)  # "l" is trainable now (the last applied)
    peftkit.set_active(model, ["k", "l"])
    model.eval()

    # The reference: a plain model whose weights carry both updates, computed by hand.
    reference = tiny_llama()
    layers = dict(reference.named_modules())
    for path, unit in units(model, "k").items():
        with torch.no_grad():
            layers[path].weight.add_(_raw_lokr_delta(unit))
    for path, host in ((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer) and "l" in m.adapters):
        lora = host.adapters["l"]
        with torch.no_grad():
            layers[path].weight.add_(lora.lora_B @ lora.lora_A * (6 / 2))
    assert_same(run(model, inputs), run(reference, inputs), run(tiny_llama(), inputs))

    # One layer with both: base + LoKr's term + LoRA's term.
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        lokr, lora = q.adapters["k"], q.adapters["l"]
        want = q.base_layer(x) + F.linear(x, _raw_lokr_delta(lokr)) + (x @ lora.lora_A.t() @ lora.lora_B.t()) * 3
        torch.testing.assert_close(q(x), want, rtol=0, atol=1e-5)

    # Merged equals unmerged, and unmerging restores the base weights.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = run(model, inputs)
    peftkit.merge(model)
    assert_same(run(model, inputs), want)
    peftkit.unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


# -- dropouts ------------------------------------------------------------------------------------


def test_dropouts_act_only_in_training() -> None:
    inputs = model_inputs("llama")
    model = peftkit.apply(tiny_llama(), LoKrConfig(r=2, init_weights=False, rank_dropout=0.5, module_dropout=0.3))
    perturb_trainable(model)
    plain = copy.deepcopy(model)
    for unit in units(plain).values():
        unit.rank_dropout = unit.module_dropout = 0.0
    model.eval()
    torch.manual_seed(0)
    evaluated = run(model, inputs)
    assert torch.equal(run(model, inputs), evaluated)
    assert torch.equal(evaluated, run(plain.eval(), inputs))
    model.train()
    torch.manual_seed(0)
    trained = [run(model, inputs) for _ in range(3)]
    assert all((t - evaluated).abs().max() > 1e-4 for t in trained)
    assert (trained[0] - trained[1]).abs().max() > 1e-4


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_masks_output_features_of_the_update(scale) -> None:
    torch.manual_seed(0)
    net = TwoLinear(32, 48)
    peftkit.apply(net, LoKrConfig(target_modules=["fc"], r=2, init_weights=False, rank_dropout=0.5,
                                  rank_dropout_scale=scale))
    host = net.fc
    unit = host.adapters["default"]
    x = torch.randn(4, 32)
    net.train()
    torch.manual_seed(7)
    got = host(x)
    torch.manual_seed(7)
    mask = (torch.rand(48) > 0.5).float()
    if scale:
        mask = mask / mask.mean()
    with torch.no_grad():
        want = host.base_layer(x) + F.linear(x, unit.delta_weight()) * mask
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert 0 < (mask == 0).sum() < 48


@pytest.mark.parametrize("scale", [False, True])
def test_dropouts_in_training_match_hf(scale, tmp_path) -> None:
    """With the same seed, HF PEFT's and peftkit's training-mode outputs agree: the same draws
    (module dropout, then the rank mask, per layer) mean the same thing."""
    inputs = inputs_for("convnet")
    kwargs = dict(target_modules=CONVS, r=2, rank_dropout=0.4, module_dropout=0.3, rank_dropout_scale=scale)
    model = peftkit.apply(convnet(), LoKrConfig(init_weights=False, **kwargs))
    perturb_trainable(model)
    peftkit.save(model, tmp_path)
    hf = peft.PeftModel.from_pretrained(convnet(), tmp_path)
    evaluated = run(model.eval(), inputs)
    model.train()
    hf.train()
    for seed in range(4):
        torch.manual_seed(seed)
        ours = run(model, inputs)
        torch.manual_seed(seed)
        theirs = run(hf, inputs)
        assert_same(ours, theirs)
        assert (ours - evaluated).abs().max() > 1e-4


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(r=0), "r: expected a positive integer, found 0"),
    (dict(r=2.5), "r: expected a positive integer, found 2.5"),
    (dict(r=True), "r: expected a positive integer, found True"),
    (dict(alpha="8"), "alpha: expected a number, found '8'"),
    (dict(alpha=float("nan")), "alpha: expected a finite number"),
    (dict(rank_dropout=1.0), "rank_dropout: expected a number in [0.0, 1.0), found 1.0"),
    (dict(module_dropout=-0.1), "module_dropout: expected a number in [0.0, 1.0), found -0.1"),
    (dict(use_effective_conv2d="yes"), "use_effective_conv2d: expected true or false, found 'yes'"),
    (dict(decompose_both=1), "decompose_both: expected true or false, found 1"),
    (dict(rank_dropout_scale=None), "rank_dropout_scale: expected true or false, found None"),
    (dict(decompose_factor=0), "decompose_factor: expected -1 or a positive integer, found 0"),
    (dict(decompose_factor=-2), "decompose_factor: expected -1 or a positive integer, found -2"),
    (dict(decompose_factor=2.0), "decompose_factor: expected -1 or a positive integer, found 2.0"),
    (dict(decompose_factor=True), "decompose_factor: expected -1 or a positive integer, found True"),
    (dict(init_weights="gaussian"), "init_weights: expected true, false or 'lycoris', found 'gaussian'"),
    (dict(init_weights=1), "init_weights: expected true, false or 'lycoris', found 1"),
    (dict(rank_pattern={"query": 0}), "rank_pattern['query']: expected a positive integer, found 0"),
    (dict(rank_pattern=["query"]), "rank_pattern: expected a mapping"),
    (dict(alpha_pattern={"(": 2}), "alpha_pattern['(']: expected a valid regular expression"),
    (dict(alpha_pattern={"key": "x"}), "alpha_pattern['key']: expected a number, found 'x'"),
    (dict(target_modules=3), "target_modules: expected a list of module names or a regex string"),
])
def test_bad_config_values_name_field_expected_and_found(kwargs, fragment) -> None:
    with pytest.raises(peftkit.ConfigError) as info:
        LoKrConfig(**kwargs)
    assert fragment in str(info.value)


def test_config_from_hf_dict_and_refusals() -> None:
    data = peft.LoKrConfig(r=4, alpha=2, target_modules=["q"], decompose_both=True).to_dict()
    data = json.loads(json.dumps(data, default=sorted))  # as in a file (HF keeps a set in memory)
    config = registry.config_from_dict(data, source="adapter_config.json")
    assert isinstance(config, LoKrConfig) and (config.r, config.alpha, config.decompose_both) == (4, 2, True)
    with pytest.raises(peftkit.ConfigError, match=r"adapter_config.json: unknown field 'lokr_magic' = 1 for LOKR"):
        registry.config_from_dict({**data, "lokr_magic": 1}, source="adapter_config.json")
    with pytest.raises(peftkit.ConfigError, match=r"adapter_config.json: decompose_factor: expected -1"):
        registry.config_from_dict({**data, "decompose_factor": 0}, source="adapter_config.json")
    with pytest.raises(peftkit.ConfigError, match=r"peft_type: expected 'LOKR', found 'LORA'"):
        LoKrConfig.from_dict({**data, "peft_type": "LORA"})


@pytest.mark.parametrize("build,config,fragments", [
    (tiny_gpt2, LoKrConfig(), ("'transformer.h.0.attn.c_attn'", "Conv1D", "supported: Linear, Conv1d, Conv2d")),
    (tiny_gpt2, LoKrConfig(target_modules="all-linear"), ("Conv1D", "HF PEFT's LoKr does not adapt it")),
    (tiny_bert, LoKrConfig(target_modules=["word_embeddings"]),
     ("'bert.embeddings.word_embeddings'", "of type Embedding", "supported: Linear, Conv1d, Conv2d")),
    (lambda: nn.Sequential(nn.Conv3d(2, 4, 3)), LoKrConfig(target_modules=["0"]),
     ("'0'", "of type Conv3d", "supported: Linear, Conv1d, Conv2d")),
    (tiny_bert, LoKrConfig(target_modules=["attention"]), ("'bert.encoder.layer.0.attention'", "BertAttention")),
])
def test_unsupported_layers_are_refused_and_nothing_changes(build, config, fragments) -> None:
    model = build()
    before = [type(m) for m in model.modules()]
    with pytest.raises(peftkit.ConfigError) as info:
        peftkit.apply(model, config)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert [type(m) for m in model.modules()] == before
    assert not peftkit.state.has_adapters(model)


# -- the trainer -------------------------------------------------------------------------------


def test_cli_train_lokr_writes_an_adapter_hf_loads(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from cli_helpers import invoke, save_tiny_bert, write_topic_files
    from peftkit.train.options import METHOD_DEFAULTS

    model_dir = save_tiny_bert(tmp_path / "tiny-bert")
    train, evaluation = write_topic_files(tmp_path)
    out = tmp_path / "run"
    result = invoke("train", "--method", "lokr", "--model", model_dir, "--data", train, "--eval-data", evaluation,
                    "--max-steps", 3, "--batch-size", 4, "--r", 4, "--dropout", 0.1, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOKR" and config["r"] == 4 and config["alpha"] == 16
    assert (config["rank_dropout"], config["module_dropout"]) == (0.1, 0.0)  # --dropout is the rank dropout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["lr"] == METHOD_DEFAULTS["lokr"]["lr"]

    def base():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3,
                                                                  ignore_mismatched_sizes=True).eval()

    inputs = {"input_ids": torch.randint(1, 1000, (2, 9), generator=torch.Generator().manual_seed(2))}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    hf = peft.PeftModel.from_pretrained(base(), adapter).eval()
    ours = peftkit.load(base(), adapter)
    trained = run(ours, inputs)
    assert_same(run(hf, inputs), trained)
    # The adapter trained: not the identity any more.
    assert any(t.any() for k, t in load_file(adapter / WEIGHTS).items() if k.endswith(("lokr_w1", "lokr_w1_a")))
    # `peftkit merge` writes a plain model computing the same.
    merged = invoke("merge", "--adapter", out, "--out", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lokr" in n for n, _ in plain.named_parameters())
    assert_same(run(plain, inputs), trained)


@pytest.mark.parametrize("extra", [{}, {"init_weights": False}, {"init_weights": "lycoris"},
                                   {"decompose_both": True, "r": 2}])
def test_the_same_seed_draws_hf_peft_s_initial_weights(extra) -> None:
    """Runs beside HF PEFT start from the same weights (the RNG is drawn in HF's order)."""
    import peft

    settings = {"r": 4, "alpha": 8, "target_modules": ["query", "value"], **extra}
    torch.manual_seed(7)
    ours = peftkit.apply(tiny_bert(), peftkit.LoKrConfig(**settings))
    torch.manual_seed(7)
    theirs = peft.get_peft_model(tiny_bert(), peft.LoKrConfig(**settings))
    mine = {k.replace(".adapters.default", ""): v for k, v in ours.state_dict().items() if "lokr_" in k}
    hf = {k.replace("base_model.model.", "").replace(".default", ""): v
          for k, v in theirs.state_dict().items() if "lokr_" in k}
    assert mine.keys() == hf.keys() and mine
    assert all(torch.equal(mine[k], hf[k]) for k in mine), [k for k in mine if not torch.equal(mine[k], hf[k])]

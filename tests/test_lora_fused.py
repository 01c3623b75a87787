"""LoRA's one-node training path (``methods/lora_fused.py``) computes what the plain path does:
the output and every gradient, for Linear and Conv1D bases, with and without dropout, and it
steps aside wherever it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.methods import lora_fused
from peftkit.methods.lora import LoraConfig


class Net(nn.Module):
    def __init__(self, conv1d: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.proj = Conv1D(12, 10) if conv1d else nn.Linear(10, 12, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _model(conv1d=False, bias=True, dropout=0.0, seed=0, **fields):
    torch.manual_seed(seed)
    net = Net(conv1d, bias)
    fields.setdefault("init_lora_weights", "gaussian")
    model = peftkit.apply(net, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=dropout,
                                          **fields))
    with torch.no_grad():  # B non-zero, so that every gradient is non-trivial
        model.proj.adapters["default"].lora_B.normal_()
    return model.train()


def _reference(model, x):
    """base(x) + s·B(A·dropout(x)), computed by hand with autograd's own nodes."""
    layer = model.proj
    unit = layer.adapters["default"]
    return layer.base_layer(x) + (unit.dropped(x) @ unit.lora_A.t()) @ unit.lora_B.t() * unit.scaling


def _grads(model, x, run):
    unit = model.proj.adapters["default"]
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(123)  # the same dropout mask for both paths
    out = run(model, x)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = {"out": out.detach(), "A": unit.lora_A.grad.clone(), "B": unit.lora_B.grad.clone()}
    if x.requires_grad:
        grads["x"] = x.grad.clone()
    unit.lora_A.grad = unit.lora_B.grad = None
    return grads


def _fused_nodes(out) -> int:
    """How many of the graph's nodes are the one-node path's."""
    return sum(name.startswith("_LoraDense") for name in _node_names(out))


def _node_names(out):
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return [type(fn).__name__ for fn in seen]


@pytest.fixture(params=[False, True], ids=["low-rank", "merged-weight"])
def merged(request, monkeypatch):
    """Both forms of the node: low-rank passes, or the layer run on W + s·BA built on the fly."""
    monkeypatch.setattr(lora_fused, "MERGED_WEIGHT", request.param)
    return request.param


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_equals_plain(conv1d, dropout, x_grad, merged, monkeypatch):
    model = _model(conv1d=conv1d, dropout=dropout)
    x = torch.randn(3, 5, 10, requires_grad=x_grad)
    builds = []
    real = lora_fused._with_update
    monkeypatch.setattr(lora_fused, "_with_update", lambda *a: builds.append(1) or real(*a))
    fused = _grads(model, x, lambda m, x: m(x))
    assert len(builds) == (1 + x_grad if merged and dropout == 0 else 0)  # built for the forward and dx
    plain = _grads(model, x, _reference)
    assert fused.keys() == plain.keys()
    for key in fused:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-5, atol=1e-5, msg=key)
    assert _fused_nodes(model(x)) == 1


def test_merged_weight_only_where_it_moves_fewer_bytes(monkeypatch):
    monkeypatch.setattr(lora_fused, "MERGED_WEIGHT", "auto")
    w = torch.zeros(384, 384)
    assert lora_fused._merged_weight(torch.zeros(2048, 384), w)  # many tokens, a small layer
    assert not lora_fused._merged_weight(torch.zeros(16, 384), w)  # a few tokens: the low-rank passes are cheaper
    assert not lora_fused._merged_weight(torch.zeros(2048, 384), w.bfloat16())  # bf16 would round the update away


def test_fused_without_bias_and_with_frozen_a(merged):
    model = _model(bias=False)
    unit = model.proj.adapters["default"]
    unit.lora_A.requires_grad_(False)  # LoRA-FA
    x = torch.randn(4, 10, requires_grad=True)
    torch.manual_seed(0)
    out = model(x)
    out.square().sum().backward()
    gx, gb = x.grad.clone(), unit.lora_B.grad.clone()
    assert unit.lora_A.grad is None
    x.grad = unit.lora_B.grad = None
    _reference(model, x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gb, unit.lora_B.grad)


def _plain_only(model, x):
    return _fused_nodes(model(x)) == 0


def test_steps_aside_where_it_does_not_apply():
    x = torch.randn(2, 10, requires_grad=True)
    model = _model()
    assert not _plain_only(model, x)
    model.proj.base_layer.weight.requires_grad_(True)  # a trainable base weight needs its own gradient
    assert _plain_only(model, x)
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _plain_only(model, x)
    handle = model.proj.base_layer.register_forward_hook(lambda *a: None)
    assert _plain_only(model, x)
    handle.remove()
    assert not _plain_only(model, x)
    assert _plain_only(_model(lora_bias=True, init_lora_weights=True), x)
    with torch.no_grad():  # inference keeps its in-place path
        out = model(x)
    assert out.grad_fn is None


def test_training_through_the_fused_path_matches_plain_training(merged):
    """Several AdamW steps: the same parameters as the plain path's."""
    results = []
    for fuse in (True, False):
        model = _model(dropout=0.0 if merged else 0.1)
        original = lora_fused.fusable
        if not fuse:
            lora_fused.fusable = lambda *a: False
        try:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            torch.manual_seed(5)
            for _ in range(5):
                x = torch.randn(6, 10)
                model(x).sin().sum().backward()
                opt.step()
                opt.zero_grad()
        finally:
            lora_fused.fusable = original
        unit = model.proj.adapters["default"]
        results.append((unit.lora_A.detach().clone(), unit.lora_B.detach().clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("conv1d", [False, True])
def test_inference_on_the_merged_weight_equals_the_plain_path(conv1d, monkeypatch):
    model = _model(conv1d=conv1d, dropout=0.2).eval()
    x = torch.randn(64, 10)
    with torch.no_grad():
        monkeypatch.setattr(lora_fused, "MERGED_WEIGHT", True)
        merged_out = model(x)
        monkeypatch.setattr(lora_fused, "MERGED_WEIGHT", False)
        plain_out = model(x)
        reference = _reference(model, x)
    torch.testing.assert_close(merged_out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain_out, reference, rtol=1e-5, atol=1e-5)
    weight = model.proj.base_layer.weight.clone()
    with torch.no_grad():
        monkeypatch.setattr(lora_fused, "MERGED_WEIGHT", True)
        model(x)
    assert torch.equal(model.proj.base_layer.weight, weight)  # built for the call, the base untouched


def test_inference_in_training_mode_keeps_dropout(monkeypatch):
    """Under no_grad in training mode the dropout mask is drawn as the plain path draws it."""
    monkeypatch.setattr(lora_fused, "MERGED_WEIGHT", True)
    model = _model(dropout=0.5)
    x = torch.randn(8, 10)
    with torch.no_grad():
        torch.manual_seed(3)
        out = model(x)
        torch.manual_seed(3)
        reference = _reference(model, x)
    torch.testing.assert_close(out, reference)


# -- DoRA's node -------------------------------------------------------------------------------


def _dora(conv1d=False, bias=True, seed=0):
    model = _model(conv1d=conv1d, bias=bias, seed=seed, use_dora=True)
    unit = model.proj.adapters["default"]
    with torch.no_grad():
        unit.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, unit.lora_magnitude_vector.numel()))
    return model


def _dora_reference(model, x):
    """m / ‖W + s·BA‖ (a constant) ⊙ x (W + s·BA)ᵀ + b, by hand."""
    layer, unit = model.proj, model.proj.adapters["default"]
    w = unit._base_weight()
    adapted = w + unit.scaling * unit.lora_B @ unit.lora_A
    scale = unit.lora_magnitude_vector / adapted.detach().norm(dim=1)
    out = scale * (x @ adapted.t())
    bias = layer.base_layer.bias
    return out + bias if bias is not None else out


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_dora_node_equals_the_definition(conv1d, bias, merged):
    model = _dora(conv1d, bias)
    unit = model.proj.adapters["default"]
    x = torch.randn(3, 5, 10, requires_grad=True)
    results = []
    for run in (lambda m, x: m(x), _dora_reference):
        out = run(model, x)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results.append([out.detach(), x.grad.clone(), unit.lora_A.grad.clone(), unit.lora_B.grad.clone(),
                        unit.lora_magnitude_vector.grad.clone()])
        x.grad = unit.lora_A.grad = unit.lora_B.grad = unit.lora_magnitude_vector.grad = None
    for got, want, name in zip(*results, ("out", "x", "A", "B", "m")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    names = _node_names(model(x))
    assert ("_DoraDenseBackward" in names) == merged


@pytest.mark.parametrize("conv1d", [False, True])
def test_dora_inference_on_the_merged_weight(conv1d, monkeypatch):
    model = _dora(conv1d).eval()
    x = torch.randn(64, 10)
    with torch.no_grad():
        outs = []
        for flag in (True, False):
            monkeypatch.setattr(lora_fused, "MERGED_WEIGHT", flag)
            outs.append(model(x))
        reference = _dora_reference(model, x)
    torch.testing.assert_close(outs[0], reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1], reference, rtol=1e-5, atol=1e-5)


def test_a_model_on_the_meta_device_runs():
    """A LoRA model built without memory (to count parameters or plan memory) runs forward and
    backward: autocast cannot be asked about the meta device."""
    with torch.device("meta"):
        model = _model()
    x = torch.randn(4, 10, device="meta", requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert out.shape == (4, 12) and x.grad.shape == x.shape
    with torch.no_grad():
        assert model.eval()(x).is_meta

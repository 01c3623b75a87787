"""``peftkit.combine`` with HF PEFT's model-merging methods: TIES, DARE, magnitude pruning and
their ``_svd`` forms.

The merge rules are checked against references written here from the papers' definitions with
plain Python on small matrices (no torch.topk, no torch.stack); ``combine`` against the same
references applied layer by layer; and against HF PEFT's ``add_weighted_adapter`` on the same
two adapters (DARE through the same random stream: HF's ``torch.bernoulli`` is pointed at a
generator seeded like peftkit's).
"""

from __future__ import annotations

import math

import pytest
import torch

import peftkit
from peftkit.methods.combine import HOW, majority_sign, merge_tensors

from conftest import model_inputs, output_of, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


# -- references (plain Python over nested lists) -------------------------------------------------


def flat(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.reshape(-1).tolist()]


def ref_magnitude(values: list[float], density: float) -> list[float]:
    """Keep the int(density·n) entries of largest |value| (distinct magnitudes in these tests)."""
    if density >= 1:
        return list(values)
    k = int(density * len(values))
    kept = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k])
    return [v if i in kept else 0.0 for i, v in enumerate(values)]


def sign(v: float) -> int:
    return (v > 0) - (v < 0)


def ref_merge(how: str, tensors: list[list[float]], weights: list[float], density: float = 1.0,
              method: str = "total", masks: list[list[float]] | None = None) -> list[float]:
    """TIES / magnitude pruning / DARE (with given 0/1 ``masks``) entry by entry."""
    if how in ("ties", "magnitude_prune"):
        tensors = [ref_magnitude(t, density) for t in tensors]
    if how in ("dare_linear", "dare_ties"):
        tensors = [[v * m / density for v, m in zip(t, mask)] for t, mask in zip(tensors, masks)]
    out = []
    for j in range(len(tensors[0])):
        column = [t[j] for t in tensors]
        if how in ("ties", "dare_ties"):
            votes = sum(column) if method == "total" else sum(sign(v) for v in column)
            elected = 1 if votes >= 0 else -1
            agree = [i for i, v in enumerate(column) if sign(v) == elected]
            out.append(sum(weights[i] * column[i] for i in agree) / max(1, len(agree)))
        else:
            out.append(sum(w * v for w, v in zip(weights, column)))
    return out


T1 = torch.tensor([[3.0, -1.0, 0.25], [0.5, -4.0, 2.0]])
T2 = torch.tensor([[-2.5, 1.5, 0.75], [1.25, 3.5, -0.1]])
T3 = torch.tensor([[1.0, -0.2, -3.0], [-0.6, 0.3, 2.2]])


def test_magnitude_prune_and_ties_by_hand():
    # density 0.5 keeps 3 of 6 entries: T1 keeps -4, 3, 2; T2 keeps 3.5, -2.5, 1.5
    got = merge_tensors("magnitude_prune", [T1, T2], [1.0, 0.5], 0.5, "total", None)
    torch.testing.assert_close(got, torch.tensor([[3.0 - 1.25, 0.75, 0.0], [0.0, -4.0 + 1.75, 2.0]]))
    # TIES, "total": entry (0,0): 3 and -2.5 → sum +0.5 → keep 3 (weight 1) alone → 3.0
    # (0,1): 0 and 1.5 → + → 0.5·1.5 / 1; (1,1): -4 and 3.5 → - → -4 / 1; (1,2): 2 and 0 → 2
    got = merge_tensors("ties", [T1, T2], [1.0, 0.5], 0.5, "total", None)
    torch.testing.assert_close(got, torch.tensor([[3.0, 0.75, 0.0], [0.0, -4.0, 2.0]]))
    for how in ("ties", "magnitude_prune"):
        for method in ("total", "frequency"):
            for density in (0.0, 0.34, 0.5, 0.8, 1.0):
                want = ref_merge(how, [flat(T1), flat(T2), flat(T3)], [0.7, -1.2, 0.4], density, method)
                got = merge_tensors(how, [T1, T2, T3], [0.7, -1.2, 0.4], density, method, None)
                assert flat(got) == pytest.approx(want, abs=1e-6), (how, method, density)


def test_majority_sign_total_and_frequency_differ():
    # one large negative against two small positives: "total" elects −, "frequency" elects +
    stacked = torch.tensor([[-5.0], [1.0], [1.0]])
    assert majority_sign(stacked, "total").view(-1).tolist() == [True, False, False]
    assert majority_sign(stacked, "frequency").view(-1).tolist() == [False, True, True]
    assert majority_sign(torch.tensor([[1.0], [-1.0]]), "total").view(-1).tolist() == [True, False]  # 0 → +


def test_dare_is_seeded_rescaled_and_matches_the_reference():
    density = 0.5
    got = merge_tensors("dare_linear", [T1, T2], [1.0, 2.0], density, "total", torch.Generator().manual_seed(3))
    again = merge_tensors("dare_linear", [T1, T2], [1.0, 2.0], density, "total", torch.Generator().manual_seed(3))
    other = merge_tensors("dare_linear", [T1, T2], [1.0, 2.0], density, "total", torch.Generator().manual_seed(4))
    assert torch.equal(got, again) and not torch.equal(got, other)
    g = torch.Generator().manual_seed(3)  # the masks the generator gives, in the documented order
    masks = [flat(torch.bernoulli(torch.full_like(t, density), generator=g)) for t in (T1, T2)]
    assert flat(got) == pytest.approx(ref_merge("dare_linear", [flat(T1), flat(T2)], [1.0, 2.0], density,
                                                masks=masks), abs=1e-6)
    for method in ("total", "frequency"):
        g = torch.Generator().manual_seed(5)
        masks = [flat(torch.bernoulli(torch.full_like(t, density), generator=g)) for t in (T1, T2, T3)]
        got = merge_tensors("dare_ties", [T1, T2, T3], [1.0, -0.5, 2.0], density, method,
                            torch.Generator().manual_seed(5))
        assert flat(got) == pytest.approx(ref_merge("dare_ties", [flat(T1), flat(T2), flat(T3)], [1.0, -0.5, 2.0],
                                                    density, method, masks=masks), abs=1e-6)
    # unbiased: the mean over many masks approaches the plain weighted sum
    g = torch.Generator().manual_seed(0)
    big = torch.randn(64, 64, generator=g)
    mean = sum(merge_tensors("dare_linear", [big], [1.0], 0.3, "total", g) for _ in range(200)) / 200
    assert (mean - big).abs().mean() < 0.1 * big.abs().mean()


# -- combine on a model ------------------------------------------------------------------------


def _two_loras(build=tiny_llama, r=(4, 4), alphas=(8, 4), seeds=(0, 1)):
    model = build()
    for name, rank, alpha, seed in zip(("a", "b"), r, alphas, seeds):
        torch.manual_seed(seed)
        peftkit.apply(model, peftkit.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                                target_modules=None if name == "a" or build is not tiny_llama
                                                else ["q_proj", "v_proj", "o_proj"]), name=name)
    return model


def test_combine_ties_is_the_rule_applied_to_a_and_b():
    model = _two_loras()
    w = [0.8, -0.6]
    peftkit.combine(model, ["a", "b"], w, "t", how="ties", density=0.5, majority_sign_method="frequency")
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        host = model.get_submodule(path)
        units = [host.adapters[n] for n in ("a", "b") if n in host.adapters]
        ws = [wi for n, wi in zip(("a", "b"), w) if n in host.adapters]
        scales = [wi * u.scaling for wi, u in zip(ws, units)]
        wa = [math.copysign(math.sqrt(abs(s)), s) for s in scales]
        wb = [math.sqrt(abs(s)) for s in scales]
        a = ref_merge("ties", [flat(u.lora_A) for u in units], wa, 0.5, "frequency")
        b = ref_merge("ties", [flat(u.lora_B) for u in units], wb, 0.5, "frequency")
        new = host.adapters["t"]
        assert new.scaling == 1.0 and new.r == 4
        assert flat(new.lora_A) == pytest.approx(a, abs=1e-6)
        assert flat(new.lora_B) == pytest.approx(b, abs=1e-6)
    # o_proj has only adapter b: TIES of one tensor is its pruned, weighted self
    assert "a" not in model.get_submodule("model.layers.1.self_attn.o_proj").adapters


def test_combine_svd_forms_truncate_the_merged_delta():
    model = _two_loras()
    peftkit.combine(model, ["a", "b"], [1.0, 0.5], "m", how="magnitude_prune_svd", density=0.3, svd_rank=3)
    host = model.model.layers[0].self_attn.q_proj
    deltas = [host.adapters[n].delta_weight().detach() for n in ("a", "b")]
    merged = torch.tensor(ref_merge("magnitude_prune", [flat(d) for d in deltas], [1.0, 0.5], 0.3)).view(deltas[0].shape)
    singular = torch.linalg.svdvals(merged.double())
    got = host.adapters["m"].delta_weight().detach().double()
    assert host.adapters["m"].r == 3
    err = torch.linalg.matrix_norm(got - merged.double())
    torch.testing.assert_close(err, singular[3:].norm(), rtol=1e-4, atol=1e-6)  # Eckart–Young


def _hf_pair(tmp_path, model, build):
    for name in ("a", "b"):
        peftkit.save(model, tmp_path / name, name=name)
    hf = peft.PeftModel.from_pretrained(build(), tmp_path / "a", adapter_name="a")
    hf.load_adapter(tmp_path / "b", adapter_name="b")
    return hf.eval()


@pytest.mark.parametrize("how, density, method", [
    ("linear", None, "total"), ("ties", 0.5, "total"), ("ties", 0.3, "frequency"), ("magnitude_prune", 0.6, "total"),
    ("dare_linear", 0.5, "total"), ("dare_ties", 0.7, "frequency"),
    ("svd", None, "total"), ("ties_svd", 0.4, "total"), ("magnitude_prune_svd", 0.5, "total"),
    ("dare_linear_svd", 0.6, "total"), ("dare_ties_svd", 0.5, "frequency"),
])
def test_combine_equals_hf_add_weighted_adapter(tmp_path, monkeypatch, how, density, method):
    build = tiny_llama
    model = _two_loras(build)
    hf = _hf_pair(tmp_path, model, build)
    weights = [0.9, -0.7]
    real = torch.bernoulli
    hf_stream = torch.Generator().manual_seed(11)
    monkeypatch.setattr(torch, "bernoulli", lambda t, *args, **kwargs: real(t, generator=hf_stream))
    hf.add_weighted_adapter(["a", "b"], weights, "m", combination_type=how, density=density,
                            majority_sign_method=method)
    monkeypatch.undo()
    hf.set_adapter("m")
    peftkit.combine(model, ["a", "b"], weights, "m", how=how, density=density, majority_sign_method=method,
                    generator=torch.Generator().manual_seed(11))
    inputs = model_inputs("llama")
    ours, theirs = output_of(model, inputs), output_of(hf, inputs)
    peftkit.set_active(model, "a")
    assert (ours - output_of(model, inputs)).abs().max() > 1e-3  # the merge changed something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("how", ["ties_svd", "dare_linear_svd"])
def test_combine_svd_forms_equal_hf_on_gpt2_conv1d(tmp_path, monkeypatch, how):
    """GPT-2's Conv1D stores the weight (in, out): the masks are drawn over ΔW in that layout."""
    model = _two_loras(tiny_gpt2)
    hf = _hf_pair(tmp_path, model, tiny_gpt2)
    real = torch.bernoulli
    hf_stream = torch.Generator().manual_seed(2)
    monkeypatch.setattr(torch, "bernoulli", lambda t, *args, **kwargs: real(t, generator=hf_stream))
    hf.add_weighted_adapter(["a", "b"], [1.0, 0.5], "m", combination_type=how, density=0.5)
    monkeypatch.undo()
    hf.set_adapter("m")
    peftkit.combine(model, ["a", "b"], [1.0, 0.5], "m", how=how, density=0.5, generator=torch.Generator().manual_seed(2))
    inputs = model_inputs("gpt2")
    torch.testing.assert_close(output_of(model, inputs), output_of(hf, inputs), rtol=0, atol=2e-5)


def test_combine_merges_save_and_load_like_any_lora(tmp_path):
    model = _two_loras()
    peftkit.combine(model, ["a", "b"], [0.5, 0.5], "d", how="dare_ties", density=0.5,
                    generator=torch.Generator().manual_seed(0))
    inputs = model_inputs("llama")
    expected = output_of(model, inputs)
    peftkit.save(model, tmp_path, name="d")
    fresh = peftkit.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(output_of(fresh, inputs), expected, rtol=0, atol=0)


def test_combine_merge_errors():
    model = _two_loras()
    assert {"ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
            "magnitude_prune_svd"} <= set(HOW)
    with pytest.raises(peftkit.ConfigError, match="density"):
        peftkit.combine(model, ["a", "b"], [1.0, 1.0], "x", how="ties")
    with pytest.raises(peftkit.ConfigError, match=r"density: expected a number in \(0, 1\]"):
        peftkit.combine(model, ["a", "b"], [1.0, 1.0], "x", how="dare_linear", density=0.0)
    with pytest.raises(peftkit.ConfigError, match="density"):
        peftkit.combine(model, ["a", "b"], [1.0, 1.0], "x", how="magnitude_prune", density=1.5)
    with pytest.raises(peftkit.ConfigError, match="majority_sign_method"):
        peftkit.combine(model, ["a", "b"], [1.0, 1.0], "x", how="ties", density=0.5, majority_sign_method="mean")
    with pytest.raises(peftkit.ConfigError, match="equal ranks"):
        peftkit.combine(_two_loras(r=(2, 4)), ["a", "b"], [1.0, 1.0], "x", how="ties", density=0.5)
    peftkit.combine(_two_loras(r=(2, 4)), ["a", "b"], [1.0, 1.0], "x", how="ties_svd", density=0.5)  # any ranks


@pytest.mark.parametrize("fields, named", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"trainable_token_indices": [1, 2], "target_modules": ["q_proj"]}, "trainable_token_indices"),
])
def test_adapters_that_are_more_than_low_rank_updates_are_refused(fields, named) -> None:
    from conftest import tiny_llama

    model = tiny_llama()
    peftkit.apply(model, peftkit.LoraConfig(r=2, init_lora_weights=False), name="plain")
    peftkit.apply(model, peftkit.LoraConfig(r=2, **{"target_modules": None, **fields}), name="special")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.ConfigError, match=rf"adapter 'special' cannot combine: it uses {named}"):
        peftkit.combine(model, ["plain", "special"], [1.0, 1.0], "both")
    assert "both" not in peftkit.state.get_state(model).configs
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

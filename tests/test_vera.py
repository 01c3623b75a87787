"""VeRA (``methods/vera.py``) beyond the conformance suite.

- Files exchanged with HF PEFT both ways, with equal outputs (every trainable parameter moved
  after init), on tiny BERT (default targets, layers of several shapes, a classifier head in
  ``modules_to_save``, layer filters, ``bias="all"``), tiny Llama and GPT-2 (``Conv1D``), with
  ``save_projection`` True and False (a file without the projections regenerates them from
  ``projection_prng_key``, bit-equal to HF's).
- peftkit's file keys, tensors and config fields equal to those HF PEFT writes for the same
  adapter; HF's merge of a peftkit file equals the unmerged outputs and peftkit's merge.
- The forward pass and ΔW against the paper's formula (Linear and Conv1D layouts); composition
  with LoRA against a hand-computed output; two VeRA adapters sharing one pair of projections
  (HF PEFT's rules, both ways with HF); the shared host is frozen, owns no parameters, goes on
  unload and follows the model through ``to``/``deepcopy``.
- A refused layer or a refused second adapter leaves the model exactly as it was (including
  the rollback of a host ``build_units`` had installed); bad config values are ``ConfigError``s;
  ``peftkit train --method vera`` writes an adapter HF PEFT loads, with VeRA's trainer defaults.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import peftkit
from peftkit import registry
from peftkit.inject import adapter_parameters
from peftkit.layer import AdapterLayer
from peftkit.methods.vera import VeraConfig, VeraLinear, VeraProjections, make_projections

from cli_helpers import assert_clean_error, invoke, save_tiny_bert, write_topic_files
from interop_helpers import assert_same, hf_from_pretrained, perturb_trainable, run
from conftest import model_inputs, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = "adapter_model.safetensors"
PROJECTION_KEYS = {"base_model.vera_A", "base_model.vera_B"}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


BUILD = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2, "mlp": mlp}
HF_TASK = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM"}


def inputs_for(kind: str) -> dict:
    if kind == "mlp":
        return {"x": torch.randn(3, 8, generator=torch.Generator().manual_seed(5))}
    return model_inputs(kind)


def hf_config(kind: str, **kwargs) -> "peft.VeraConfig":
    return peft.VeraConfig(task_type=HF_TASK.get(kind), **kwargs)


def hf_quiet(fn, *args, **kwargs):
    """HF PEFT warns on every save_projection=False and fan_in_fan_out fix-up; not what is tested."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _lambdas(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if "vera_lambda" in n]


# -- the case matrix, shared by both directions ----------------------------------------------


@dataclass
class Case:
    id: str
    kind: str
    kwargs: dict = field(default_factory=dict)


CASES = [
    Case("bert-default-targets", "bert"),  # r = 256 (HF's default), query/value, the classifier saved
    # query/value (32 -> 32), intermediate (32 -> 64), both output.dense (64 -> 32 and 32 -> 32):
    # projections sized (r, 64) / (64, r), each layer its own corner; regenerated from the key.
    Case("bert-shapes-no-projection", "bert",
         dict(target_modules=["query", "value", "intermediate.dense", "output.dense"], r=8,
              projection_prng_key=7, save_projection=False)),
    Case("bert-modules-to-save-layers", "bert",
         dict(target_modules=["query", "key", "value"], layers_to_transform=[1], layers_pattern="layer",
              modules_to_save=["classifier"], r=6, d_initial=0.5)),
    Case("bert-bias-all", "bert", dict(target_modules=["query", "value"], r=8, bias="all")),
    Case("llama-shapes", "llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], r=12)),
    # Dropout acts in training only: these eval-mode outputs must agree exactly.
    Case("llama-all-linear-dropout-no-projection", "llama",
         dict(target_modules="all-linear", r=4, vera_dropout=0.3, save_projection=False)),
    Case("gpt2-default-targets", "gpt2", dict(r=16)),  # c_attn (Conv1D, 32 -> 96)
    Case("gpt2-conv1d-no-projection", "gpt2",
         dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=8, save_projection=False)),
]
CASE_IDS = [c.id for c in CASES]
MERGE_IDS = ["bert-shapes-no-projection", "llama-shapes", "gpt2-conv1d-no-projection"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hf_adapter_loads_in_peftkit(case: Case, tmp_path) -> None:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    hf = hf_quiet(peft.get_peft_model, build(), hf_config(case.kind, init_weights=False, **case.kwargs))
    assert perturb_trainable(hf) > 0
    hf.eval()
    hf.save_pretrained(tmp_path)
    assert (PROJECTION_KEYS <= set(load_file(tmp_path / WEIGHTS))) == case.kwargs.get("save_projection", True)

    model = peftkit.load(build(), tmp_path)
    assert peftkit.read_config(tmp_path).peft_type == "VERA"
    assert torch.equal(model.peftkit_vera.vera_A, hf.base_model.vera_A["default"])
    assert torch.equal(model.peftkit_vera.vera_B, hf.base_model.vera_B["default"])
    assert_same(run(model, inputs), run(hf, inputs), run(build(), inputs))


def _peftkit_adapted(case: Case, directory, **extra) -> tuple[nn.Module, torch.Tensor]:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    model = peftkit.apply(build(), VeraConfig(init_weights=False, **case.kwargs, **extra))
    assert perturb_trainable(model) > 0
    model.eval()
    peftkit.save(model, directory)
    return model, run(model, inputs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peftkit_adapter_loads_in_hf(case: Case, tmp_path) -> None:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    _, want = _peftkit_adapted(case, tmp_path)
    hf = hf_from_pretrained(build(), tmp_path)
    assert hf.peft_config["default"].peft_type == peft.PeftType.VERA
    theirs = peft.get_peft_model_state_dict(hf)
    ours = load_file(tmp_path / WEIGHTS)
    # With bias="all" HF's state dict also has its saved head's internal copies of the bias
    # (…classifier.modules_to_save.bias), duplicates of keys peftkit writes once.
    assert set(ours) <= set(theirs)
    assert all(".modules_to_save." in k or ".original_module." in k for k in set(theirs) - set(ours))
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key
    assert_same(run(hf, inputs), want, run(build(), inputs))


@pytest.mark.parametrize("case", [c for c in CASES if c.id in MERGE_IDS], ids=MERGE_IDS)
def test_peftkit_adapter_merged_in_hf(case: Case, tmp_path) -> None:
    """HF's merge_and_unload of a peftkit file equals the unmerged outputs, and peftkit's own
    merge gives the same base weights."""
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    model, want = _peftkit_adapted(case, tmp_path)
    merged = hf_quiet(peft.PeftModel.from_pretrained, build(), tmp_path).merge_and_unload().eval()
    assert not any("vera_" in n for n, _ in merged.named_parameters())
    assert_same(run(merged, inputs), want)
    peftkit.unload(model, merge=True)
    ours, theirs = model.state_dict(), merged.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key


# -- the files ---------------------------------------------------------------------------------

FILE_CASES = ["bert-default-targets", "bert-shapes-no-projection", "bert-modules-to-save-layers",
              "llama-all-linear-dropout-no-projection", "gpt2-default-targets"]


def _hf_adapted_names(hf) -> list[str]:
    from peft.tuners.vera.layer import VeraLayer

    prefix = "base_model.model."
    return sorted(n[len(prefix):] for n, m in hf.named_modules() if isinstance(m, VeraLayer))


@pytest.mark.parametrize("case", [c for c in CASES if c.id in FILE_CASES], ids=FILE_CASES)
def test_files_equal_what_hf_writes(case: Case, tmp_path) -> None:
    """At init both sides hold the same tensors (λ_b = 0, λ_d = d_initial, the projections from
    the same key), so the files are equal tensor for tensor, not only in keys and shapes."""
    build = BUILD[case.kind]
    peftkit.save(peftkit.apply(build(), VeraConfig(**case.kwargs)), tmp_path / "pk")
    hf = hf_quiet(peft.get_peft_model, build(), hf_config(case.kind, **case.kwargs))
    hf.save_pretrained(tmp_path / "hf")

    ours, theirs = load_file(tmp_path / "pk" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key

    mine = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    hfs = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert set(mine) == set(hfs) - {"peft_version", "auto_mapping"}
    assert mine["target_modules"] == _hf_adapted_names(hf)  # the exact names adapted
    heads = {n for n, _ in build().named_modules()}  # HF adds both classifier names for SEQ_CLS
    assert set(mine["modules_to_save"] or []) & heads == set(hfs["modules_to_save"] or []) & heads
    for name in set(mine) - {"target_modules", "modules_to_save"}:
        assert mine[name] == hfs[name], name  # fan_in_fan_out too: True on GPT-2, as HF sets it
    read = hf_quiet(peft.VeraConfig.from_pretrained, tmp_path / "pk")
    for name in ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out",
                 "bias", "init_weights", "layers_to_transform", "layers_pattern", "task_type"):
        assert getattr(read, name) == mine[name], name


@pytest.mark.parametrize("r, n_in, n_out, key", [(256, 32, 32, 0), (8, 64, 96, 7), (3, 5, 2, -1), (4, 7, 9, 2**63)])
def test_projections_are_hf_peft_s_bit_for_bit(r, n_in, n_out, key) -> None:
    from peft.tuners.vera.model import _kaiming_init

    generator = torch.Generator(device="cpu").manual_seed(key)
    want_a = _kaiming_init((r, n_in), generator=generator)
    want_b = _kaiming_init((n_out, r), generator=generator)
    vera_a, vera_b = make_projections(r, n_in, n_out, key)
    assert torch.equal(vera_a, want_a) and torch.equal(vera_b, want_b)


def test_tensor_keys_and_shapes(tmp_path) -> None:
    model = peftkit.apply(BUILD["gpt2"](), VeraConfig(r=5, target_modules=["c_attn", "c_fc", "mlp.c_proj"]))
    peftkit.save(model, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / WEIGHTS).items()}
    p = "base_model.model.transformer.h"
    per_layer = {"attn.c_attn": 96, "mlp.c_fc": 128, "mlp.c_proj": 32}  # out features (λ_b)
    assert shapes == {
        "base_model.vera_A": (5, 128), "base_model.vera_B": (128, 5),  # the largest in / out
        **{f"{p}.{i}.{m}.vera_lambda_b": (n,) for i in (0, 1) for m, n in per_layer.items()},
        **{f"{p}.{i}.{m}.vera_lambda_d": (5,) for i in (0, 1) for m in per_layer},
    }
    peftkit.save(peftkit.apply(BUILD["gpt2"](), VeraConfig(r=5, save_projection=False)), tmp_path / "none")
    assert not PROJECTION_KEYS & set(load_file(tmp_path / "none" / WEIGHTS))


def test_file_without_projection_needs_none_and_refuses_them(tmp_path) -> None:
    """save_projection=False: the file has no projections and loads exactly (regenerated); a file
    that says True but lacks them, or False but has them, is refused (the strict key check)."""
    inputs = inputs_for("bert")
    model = peftkit.apply(BUILD["bert"](), VeraConfig(r=8, save_projection=False, init_weights=False))
    perturb_trainable(model)
    peftkit.save(model, tmp_path / "off")
    assert torch.equal(run(peftkit.load(BUILD["bert"](), tmp_path / "off"), inputs), run(model, inputs))
    config_path = tmp_path / "off" / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"save_projection": false', '"save_projection": true'))
    fresh = BUILD["bert"]()
    with pytest.raises(peftkit.AdapterFileError, match="missing key base_model.vera_"):
        peftkit.load(fresh, tmp_path / "off")
    assert not hasattr(fresh, "peftkit_vera") and not peftkit.state.has_adapters(fresh)


# -- the unit against the paper's formula --------------------------------------------------------


def _vera_delta(unit: VeraLinear) -> torch.Tensor:
    """Λ_b B Λ_d A, from the host's matrices, (out, in)."""
    host = unit._shared
    vera_a, vera_b = host.vera_A[:, : unit.n_in], host.vera_B[: unit.n_out]
    return torch.diag(unit.vera_lambda_b) @ vera_b @ torch.diag(unit.vera_lambda_d) @ vera_a


def test_forward_and_delta_follow_the_formula_for_linear_and_conv1d() -> None:
    torch.manual_seed(0)
    for kind, path in (("gpt2", "transformer.h.0.attn.c_attn"), ("llama", "model.layers.1.mlp.down_proj")):
        model = peftkit.apply(BUILD[kind](), VeraConfig(r=6, init_weights=False, target_modules="all-linear"))
        layer = model.get_submodule(path)
        unit = layer.adapters["default"]
        x = torch.randn(2, 3, unit.n_in)
        with torch.no_grad():
            delta = _vera_delta(unit)  # (out, in)
            assert_same(layer(x), layer.base_layer(x) + x @ delta.T)
            stored = unit.delta_weight()  # in the base weight's own layout
            assert stored.shape == layer.base_layer.weight.shape
            assert_same(stored, delta.T if kind == "gpt2" else delta)


def test_identity_at_init_and_the_init_values() -> None:
    inputs = inputs_for("llama")
    model = peftkit.apply(BUILD["llama"](), VeraConfig(r=10, d_initial=0.25))
    assert torch.equal(run(model, inputs), run(BUILD["llama"](), inputs))
    unit = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert not unit.vera_lambda_b.any() and torch.equal(unit.vera_lambda_d, torch.full((10,), 0.25))
    randomized = peftkit.apply(BUILD["llama"](), VeraConfig(r=10, init_weights=False))
    unit = randomized.model.layers[0].self_attn.q_proj.adapters["default"]
    assert torch.equal(unit.vera_lambda_b, torch.ones(32))
    assert (run(randomized, inputs) - run(BUILD["llama"](), inputs)).abs().max() > 1e-3


def test_dropout_acts_on_the_adapter_input_in_training_only() -> None:
    torch.manual_seed(0)
    model = peftkit.apply(mlp(), VeraConfig(r=4, target_modules=["fc1"], vera_dropout=0.5, init_weights=False))
    layer, x = model.fc1, torch.randn(5, 8)
    with torch.no_grad():
        delta = _vera_delta(layer.adapters["default"])
        assert_same(layer(x), layer.base_layer(x) + x @ delta.T)  # eval mode: no dropout
        model.train()
        first, second = layer(x), layer(x)
        assert not torch.allclose(first, second)
        kept = torch.randn(5, 8)  # one dropout draw reproduced by hand: the base sees the whole input
        torch.manual_seed(1)
        got = layer(kept)
        torch.manual_seed(1)
        mask = F.dropout(torch.ones_like(kept), 0.5, training=True)
        assert_same(got, layer.base_layer(kept) + (kept * mask) @ delta.T)


# -- the shared host ---------------------------------------------------------------------------


def test_projections_are_frozen_shared_buffers_no_adapter_owns() -> None:
    model = peftkit.apply(BUILD["bert"](), VeraConfig(r=8, target_modules=["query", "value", "intermediate.dense"]))
    host = model.peftkit_vera
    assert isinstance(host, VeraProjections) and host.names() == ["default"] and host.owned("default") is None
    assert list(host.parameters()) == [] and not any(k.startswith("peftkit_vera") for k in model.state_dict())
    units = [m.adapters["default"] for m in model.modules() if isinstance(m, AdapterLayer)]
    assert len(units) == 6 and all(u._shared is host for u in units)
    assert all(set(u.state_dict()) == {"vera_lambda_b", "vera_lambda_d"} for u in units)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model, "default")}
    head = model.classifier.copies["default"]
    assert trainable == {id(p) for p in _lambdas(model)} | {id(p) for p in head.parameters()}
    summary = peftkit.trainable_summary(model)
    assert summary.trainable == sum(u.vera_lambda_b.numel() + 8 for u in units) + 32 * 2 + 2
    # Training moves the vectors, never the projections.
    before = [t.clone() for t in (host.vera_A, host.vera_B)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {**inputs_for("bert"), "labels": torch.tensor([0, 1])}
    model.train()
    for _ in range(2):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(u.vera_lambda_b.any() for u in units)
    assert torch.equal(host.vera_A, before[0]) and torch.equal(host.vera_B, before[1])
    assert host.vera_A.grad is None
    peftkit.unload(model)
    assert not hasattr(model, "peftkit_vera")
    assert [type(m) for m in model.modules()] == [type(m) for m in BUILD["bert"]().modules()]


def test_the_units_follow_the_host_through_to_and_deepcopy() -> None:
    inputs = inputs_for("llama")
    model = peftkit.apply(BUILD["llama"](), VeraConfig(r=8, init_weights=False))
    want = run(model, inputs)
    twin = copy.deepcopy(model)
    units = [m.adapters["default"] for m in twin.modules() if isinstance(m, AdapterLayer)]
    assert all(u._shared is twin.peftkit_vera for u in units) and twin.peftkit_vera is not model.peftkit_vera
    assert torch.equal(run(twin, inputs), want)
    twin.double()
    assert twin.peftkit_vera.vera_A.dtype == torch.float64
    assert_same(run(twin, inputs).float(), want)


def test_a_sequential_model_is_refused_and_left_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(peftkit.ConfigError, match="as a child module .*Sequential would run"):
        peftkit.apply(model, VeraConfig(r=2, target_modules=["0", "2"]))
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear] and not peftkit.state.has_adapters(model)


# -- composition with LoRA ---------------------------------------------------------------------


def test_vera_and_lora_compose_on_the_same_and_other_layers() -> None:
    """LoRA on q/v, VeRA on q and down_proj (so A is sized for down_proj's 64 inputs and q uses
    its first 32 columns); both active: the q projection adds both terms."""
    inputs = inputs_for("llama")
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False), name="lo")
    peftkit.apply(model, VeraConfig(r=6, target_modules=["q_proj", "down_proj"], init_weights=False), name="ve")
    perturb_trainable(model)  # "ve" only
    peftkit.set_active(model, ["lo", "ve"])
    q = model.model.layers[0].self_attn.q_proj
    lora, unit = q.adapters["lo"], q.adapters["ve"]
    assert model.peftkit_vera.vera_A.shape == (6, 64) and unit.n_in == 32
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        expected = F.linear(x, q.base_layer.weight + 2.0 * lora.lora_B @ lora.lora_A + _vera_delta(unit))
        assert_same(q(x), expected)
        peftkit.set_active(model, "ve")
        assert_same(q(x), F.linear(x, q.base_layer.weight + _vera_delta(unit)))
    peftkit.set_active(model, ["lo", "ve"])
    want = run(model, inputs)
    keys = list(tiny_llama().state_dict())
    peftkit.merge(model)
    assert_same(run(model, inputs), want)
    peftkit.unmerge(model)
    peftkit.unload(model)
    assert list(model.state_dict()) == keys and not hasattr(model, "peftkit_vera")


# -- several VeRA adapters -----------------------------------------------------------------------


# The first adapter's largest layers take and give 64 features, the second's 32: it uses a corner.
FIRST, SECOND = ["query", "value", "intermediate.dense", "output.dense"], ["query", "value"]


def _two_adapters(model: nn.Module, **second) -> nn.Module:
    peftkit.apply(model, VeraConfig(r=8, target_modules=FIRST, init_weights=False), name="default")
    peftkit.apply(model, VeraConfig(r=8, target_modules=SECOND, init_weights=False, **second), name="two")
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for p in _lambdas(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def test_two_adapters_share_one_pair_of_projections(tmp_path) -> None:
    inputs = inputs_for("bert")
    model = _two_adapters(tiny_bert())
    host = model.peftkit_vera
    assert host.names() == ["default", "two"] and (host.vera_A.shape, host.vera_B.shape) == ((8, 64), (64, 8))
    assert [n for n, m in model.named_modules() if isinstance(m, VeraProjections)] == ["peftkit_vera"]
    q = model.bert.encoder.layer[0].attention.self.query
    assert q.adapters["two"]._shared is q.adapters["default"]._shared is host
    x = torch.randn(2, 3, 32)
    peftkit.set_active(model, ["default", "two"])
    with torch.no_grad():
        both = q.base_layer(x) + x @ (_vera_delta(q.adapters["default"]) + _vera_delta(q.adapters["two"])).T
        assert_same(q(x), both)
    outputs = {}
    for name in ("default", "two"):
        peftkit.set_active(model, name)
        outputs[name] = run(model, inputs)
        peftkit.save(model, tmp_path / name, name=name)
    assert not torch.allclose(outputs["default"], outputs["two"])
    # The second file holds the shared (larger) projections, as HF PEFT writes it.
    assert load_file(tmp_path / "two" / WEIGHTS)["base_model.vera_A"].shape == (8, 64)
    fresh = tiny_bert()
    peftkit.load(fresh, tmp_path / "default")
    peftkit.load(fresh, tmp_path / "two", name="two")
    for name in ("default", "two"):
        peftkit.set_active(fresh, name)
        assert torch.equal(run(fresh, inputs), outputs[name])
    # Alone, the second file does not fit a model whose projections are sized for its own layers.
    with pytest.raises(peftkit.AdapterFileError, match=r"base_model.vera_A has shape \(8, 64\) in the file but "
                                                       r"\(8, 32\) in the model"):
        peftkit.load(tiny_bert(), tmp_path / "two", name="two")
    # Deleting one keeps the host for the other; deleting the last removes it.
    peftkit.delete(model, "default")
    assert model.peftkit_vera.names() == ["two"]
    assert torch.equal(run(model, inputs), outputs["two"])
    peftkit.delete(model, "two")
    assert not hasattr(model, "peftkit_vera")
    assert [type(m) for m in model.modules()] == [type(m) for m in tiny_bert().modules()]


def test_two_adapters_both_ways_with_hf(tmp_path) -> None:
    inputs = inputs_for("bert")
    hf = peft.get_peft_model(tiny_bert(), peft.VeraConfig(r=8, target_modules=FIRST, init_weights=False))
    hf.add_adapter("two", peft.VeraConfig(r=8, target_modules=SECOND, init_weights=False))
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for _, p in sorted((n, p) for n, p in hf.named_parameters() if "vera_lambda" in n):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    hf.eval().save_pretrained(tmp_path / "hf")  # "default" at the top, "two" in its own directory
    ours = tiny_bert()
    peftkit.load(ours, tmp_path / "hf")
    peftkit.load(ours, tmp_path / "hf" / "two", name="two")
    for name in ("default", "two"):
        hf.set_adapter(name)
        peftkit.set_active(ours, name)
        assert_same(run(ours, inputs), run(hf, inputs), run(tiny_bert(), inputs))

    model = _two_adapters(tiny_bert())
    peftkit.save(model, tmp_path / "pk1", name="default")
    peftkit.save(model, tmp_path / "pk2", name="two")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "pk1").eval()
    theirs.load_adapter(tmp_path / "pk2", adapter_name="two")
    for name in ("default", "two"):
        theirs.set_adapter(name)
        peftkit.set_active(model, name)
        assert_same(run(theirs, inputs), run(model, inputs))


@pytest.mark.parametrize("second, fragment", [
    (dict(projection_prng_key=1), "adapter 'bad': projection_prng_key: expected 0 (every VeRA adapter of a model "
                                  "shares the projections of 'default'), found 1"),
    (dict(save_projection=False), "save_projection: expected True"),
    (dict(r=4), "r: expected 8"),  # HF PEFT accepts it and fails in the forward pass
    (dict(r=16), "r: expected 8"),
    (dict(target_modules=["intermediate.dense", "output.dense"]),
     "its largest layers take 64 inputs and give 64 outputs, but the shared VeRA projections of 'default' are "
     "sized for 32 and 32; add the adapter with the largest layers first"),
])
def test_a_second_adapter_that_does_not_fit_is_refused_and_changes_nothing(second, fragment) -> None:
    inputs = inputs_for("bert")
    model = peftkit.apply(tiny_bert(), VeraConfig(r=8, target_modules=["query", "value"], init_weights=False))
    want, keys = run(model, inputs), list(model.state_dict())
    types = [type(m) for m in model.modules()]
    config = dict(r=8, target_modules=["query"])
    config.update(second)
    with pytest.raises(peftkit.ConfigError) as info:
        peftkit.apply(model, VeraConfig(**config), name="bad")
    assert fragment in str(info.value)
    assert model.peftkit_vera.names() == ["default"] and list(peftkit.state.get_state(model).configs) == ["default"]
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == types
    assert torch.equal(run(model, inputs), want)


def test_reusing_larger_projections_without_saving_them_warns() -> None:
    model = peftkit.apply(tiny_bert(), VeraConfig(r=4, target_modules=["intermediate.dense"], save_projection=False))
    with pytest.warns(peftkit.PeftkitWarning, match="'two' uses the projections of 'default', sized for larger"):
        peftkit.apply(model, VeraConfig(r=4, target_modules=["query"], save_projection=False), name="two")
    saved = peftkit.apply(tiny_bert(), VeraConfig(r=4, target_modules=["intermediate.dense"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # same sizes, or the projections saved: nothing to say
        peftkit.apply(model, VeraConfig(r=4, target_modules=["intermediate.dense"], save_projection=False),
                      name="three")
        peftkit.apply(saved, VeraConfig(r=4, target_modules=["query"]), name="two")
    assert not [w for w in caught if issubclass(w.category, peftkit.PeftkitWarning)]


# -- refused layers and rollback -----------------------------------------------------------------


@pytest.mark.parametrize("kind, targets, fragments", [
    ("bert", ["query", "LayerNorm"], ["VeRA cannot adapt 'bert.embeddings.LayerNorm' of type LayerNorm",
                                      "supported: Linear, Conv1D"]),
    ("bert", ["word_embeddings"], ["'bert.embeddings.word_embeddings' of type Embedding"]),
    ("bert", ["attention"], ["'bert.encoder.layer.0.attention' of type BertAttention"]),
    ("gpt2", ["c_attn", "ln_1"], ["'transformer.h.0.ln_1' of type LayerNorm"]),
])
def test_a_refused_layer_leaves_the_model_as_it_was(kind, targets, fragments) -> None:
    model = BUILD[kind]()
    keys, types = list(model.state_dict()), [type(m) for m in model.modules()]
    with pytest.raises(peftkit.ConfigError) as info:
        peftkit.apply(model, VeraConfig(r=4, target_modules=targets))
    for fragment in fragments:
        assert fragment in str(info.value)
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == types
    assert not hasattr(model, "peftkit_vera") and not peftkit.state.has_adapters(model)


def test_a_failure_after_the_host_is_installed_is_rolled_back(monkeypatch) -> None:
    """inject's rollback: the host build_units installed goes again (first adapter), or keeps only
    the adapters it had (second adapter)."""
    inputs = inputs_for("bert")
    made = []
    real_init = VeraLinear.__init__

    def failing_init(self, *args, **kwargs):
        if len(made) == 2:
            raise peftkit.ConfigError("refused for the test")
        made.append(1)
        real_init(self, *args, **kwargs)

    model = tiny_bert()
    keys, types = list(model.state_dict()), [type(m) for m in model.modules()]
    monkeypatch.setattr(VeraLinear, "__init__", failing_init)
    with pytest.raises(peftkit.ConfigError, match="refused for the test"):
        peftkit.apply(model, VeraConfig(r=4, target_modules=["query", "value"]))
    assert not hasattr(model, "peftkit_vera") and not peftkit.state.has_adapters(model)
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == types

    monkeypatch.setattr(VeraLinear, "__init__", real_init)
    peftkit.apply(model, VeraConfig(r=4, target_modules=["query", "value"], init_weights=False))
    want = run(model, inputs)
    made.clear()
    monkeypatch.setattr(VeraLinear, "__init__", failing_init)
    with pytest.raises(peftkit.ConfigError, match="refused for the test"):
        peftkit.apply(model, VeraConfig(r=4, target_modules=["query", "value"]), name="two")
    assert model.peftkit_vera.names() == ["default"] and torch.equal(run(model, inputs), want)


def test_the_host_attribute_must_be_free() -> None:
    model = tiny_bert()
    model.peftkit_vera = nn.Linear(2, 2)
    with pytest.raises(peftkit.ConfigError, match="peftkit_vera, which holds a Linear already"):
        peftkit.apply(model, VeraConfig(r=4))
    assert isinstance(model.peftkit_vera, nn.Linear) and not peftkit.state.has_adapters(model)


# -- the config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(r=0), "r: expected a positive integer, found 0"),
    (dict(r=2.5), "r: expected a positive integer"),
    (dict(r=True), "r: expected a positive integer"),
    (dict(projection_prng_key="0"), "projection_prng_key: expected an integer seed in [-9223372036854775808, "
                                    "18446744073709551615], found '0'"),
    (dict(projection_prng_key=1.0), "projection_prng_key: expected an integer seed"),
    (dict(projection_prng_key=True), "projection_prng_key: expected an integer seed"),
    (dict(projection_prng_key=2**64), "projection_prng_key: expected an integer seed"),
    (dict(save_projection="yes"), "save_projection: expected true or false, found 'yes'"),
    (dict(vera_dropout=1.0), "vera_dropout: expected a number in [0.0, 1.0), found 1.0"),
    (dict(vera_dropout=-0.1), "vera_dropout: expected a number in [0.0, 1.0)"),
    (dict(vera_dropout="0.1"), "vera_dropout: expected a number, found '0.1'"),
    (dict(d_initial=float("inf")), "d_initial: expected a finite number"),
    (dict(d_initial=None), "d_initial: expected a number, found None"),
    (dict(fan_in_fan_out=1), "fan_in_fan_out: expected true or false, found 1"),
    (dict(init_weights="gaussian"), "init_weights: expected true or false, found 'gaussian'"),
    (dict(bias="lora_only"), "bias: expected 'none', 'all' or 'vera_only', found 'lora_only'"),
    (dict(layers_pattern="layer"), "layers_pattern: expected layers_to_transform"),
    (dict(target_modules=3), "target_modules: expected a list of module names or a regex"),
    (dict(modules_to_save="classifier"), "modules_to_save: expected a list of module names"),
])
def test_bad_config_values(kwargs, fragment) -> None:
    with pytest.raises(peftkit.ConfigError) as info:
        VeraConfig(**kwargs)
    assert fragment in str(info.value)


def test_config_defaults_and_file_fields() -> None:
    hf = peft.VeraConfig()
    ours = VeraConfig()
    for name in ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out",
                 "bias", "init_weights", "target_modules", "modules_to_save", "layers_to_transform",
                 "layers_pattern"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.r == 256 and VeraConfig.unsupported_defaults == {}
    data = VeraConfig(r=4).to_dict()
    assert data["peft_type"] == "VERA" and registry.config_from_dict(data) == VeraConfig(r=4)
    with pytest.raises(peftkit.ConfigError, match="unknown field 'lora_alpha' = 16 for VERA"):
        registry.config_from_dict({**data, "lora_alpha": 16}, source="adapter_config.json")
    with pytest.raises(peftkit.ConfigError, match="adapter_config.json: d_initial: expected a number"):
        registry.config_from_dict({**data, "d_initial": "small"}, source="adapter_config.json")
    registry.config_from_dict({**data, "peft_version": "0.21.2", "auto_mapping": None})
    assert "exclude_modules" not in VeraConfig(exclude_modules=["key"]).file_dict(["a.query"])
    assert peftkit.VeraConfig is VeraConfig


# -- the trainer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    work = tmp_path_factory.mktemp("vera-cli")
    return work, save_tiny_bert(work / "tiny-bert"), write_topic_files(work)


def test_cli_defaults_are_vera_s() -> None:
    from peftkit.train.methods import build_config
    from peftkit.train.options import build_options

    options = build_options({}, {"method": "vera"})
    defaults = registry.get("VERA").cli[0].defaults
    assert (options.r, options.lr, options.dropout) == (256, defaults["lr"], 0.0)
    config = build_config(options, task_type="SEQ_CLS", modules_to_save=["classifier"])
    assert isinstance(config, VeraConfig) and (config.r, config.vera_dropout) == (256, 0.0)
    assert config.modules_to_save == ["classifier"] and config.target_modules is None
    given = build_config(build_options({}, {"method": "vera", "r": 32, "dropout": 0.1, "lr": 1e-3,
                                            "targets": "query,value"}))
    assert (given.r, given.vera_dropout, given.target_modules) == (32, 0.1, ["query", "value"])
    assert build_options({}, {"method": "vera", "lr": 1e-3}).lr == 1e-3
    assert build_options({}, {"method": "lora"}).r == 8  # the defaults are VeRA's only


def test_cli_train_writes_an_adapter_hf_loads(cli_files) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    work, tiny_model, (train, _) = cli_files
    out = work / "run"
    result = invoke("train", "--method", "vera", "--model", tiny_model, "--data", train, "--max-steps", 3,
                    "--batch-size", 4, "--r", 16, "--targets", "query,value,dense", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["vera_dropout"], config["save_projection"]) == (16, 0.0, True)
    assert "classifier" in config["modules_to_save"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "vera" and summary["options"]["lr"] == registry.get("VERA").cli[0].defaults["lr"]
    assert "VERA" in invoke("info", out).stdout

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    inputs = dict(tokenizer(["the cat plays piano", "interest on savings"], padding=True, return_tensors="pt"))

    def base():
        return AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3,
                                                                  ignore_mismatched_sizes=True).eval()

    ours = peftkit.load(base(), adapter)
    theirs = peft.PeftModel.from_pretrained(base(), adapter).eval()
    assert theirs.peft_config["default"].peft_type == peft.PeftType.VERA
    assert_same(run(theirs, inputs), run(ours, inputs))
    tensors = load_file(adapter / WEIGHTS)  # the three steps trained the vectors, not only the head
    assert any(k.endswith("vera_lambda_b") and v.any() for k, v in tensors.items())


def test_cli_refuses_options_vera_does_not_take(cli_files) -> None:
    work, tiny_model, (train, _) = cli_files
    assert_clean_error(invoke("train", "--method", "vera", "--alpha", 4, "--model", tiny_model, "--data", train,
                              "--max-steps", 1, "--out", work / "nope"),
                       "--alpha does not apply to --method vera")

"""OFT (``methods/oft.py``) beyond the conformance suite.

- Files exchanged with HF PEFT both ways, with equal outputs (every trainable parameter moved
  after init): tiny BERT (HF's default block size, ``r`` instead of ``oft_block_size``, exact
  Cayley and shorter Neumann series, ``coft``, ``block_share``, an Embedding target, layer
  filters, ``bias="all"``, a classifier in ``modules_to_save``), tiny Llama (``all-linear``), a
  small conv net (1x1 convolutions with stride and padding); HF's merge of a peftkit file equals
  its unmerged outputs and peftkit's merged weights.
- k×k convolutions: peftkit computes the rotated filter, which is what HF PEFT's merge computes;
  HF PEFT 0.21's unmerged k×k forward is not even the identity at init (documented here).
- File keys, shapes, dtypes and config fields equal to HF PEFT's.
- The rotation itself: orthogonal with determinant +1 and the Cayley form for the exact
  transform, HF's Neumann coefficients, block-diagonal structure, ``block_share``, ``r`` vs
  ``oft_block_size``; the Linear / Conv2d forward and the merged weight against hand-built ones;
  unmerging restores the weight bit for bit; COFT's projection; module dropout (training only).
- Composition with LoRA on the same layer (both active orders) and on other layers, against a
  hand-computed output; two OFT adapters (or OFT and DoRA) on one layer refused.
- Bad configs and unsupported layers are ``ConfigError``s naming what is wrong;
  ``peftkit train --method oft`` writes an adapter HF PEFT loads.
"""

from __future__ import annotations

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
from peftkit.layer import AdapterLayer
from peftkit.methods.oft import OFTConfig, neumann_powers, nearest_divisor

from cli_helpers import invoke, save_tiny_bert, write_topic_files
from conftest import model_inputs, tiny_bert, tiny_gpt2, tiny_llama
from interop_helpers import assert_same, hf_from_pretrained, perturb_trainable, run

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Failed to load CPU gemm_4bit"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out")]
WEIGHTS = "adapter_model.safetensors"


# -- small non-transformers models ------------------------------------------------------------


class ConvNet(nn.Module):
    """A 3x3 conv (stride 2), two 1x1 convs (the second with stride 2 and padding 1), Linear layers;
    every input dimension a multiple of 3: (B, 4, 8, 8) images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1)  # dim 36 -> (B, 6, 4, 4)
        self.pw = nn.Conv2d(6, 6, kernel_size=1)  # dim 6
        self.pw2 = nn.Conv2d(6, 4, kernel_size=1, stride=2, padding=1)  # dim 6 -> (B, 4, 3, 3)
        self.fc = nn.Linear(36, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pw2(torch.relu(self.pw(torch.relu(self.conv(x))))))
        return self.head(torch.relu(self.fc(h.flatten(1))))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _seeded(cls):
    def build(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return cls().eval()
    return build


BUILD = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2, "convnet": _seeded(ConvNet), "mlp": _seeded(MLP)}
HF_TASK = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM"}


def inputs_for(kind: str) -> dict:
    g = torch.Generator().manual_seed(5)
    if kind == "convnet":
        return {"x": torch.randn(2, 4, 8, 8, generator=g)}
    if kind == "mlp":
        return {"x": torch.randn(3, 8, generator=g)}
    return model_inputs(kind)


def hf_config(kind: str, **kwargs) -> "peft.OFTConfig":
    return peft.OFTConfig(task_type=HF_TASK.get(kind), **kwargs)


def oft_units(model: nn.Module, name: str = "default") -> list:
    return [m.adapters[name] for m in model.modules() if isinstance(m, AdapterLayer) and name in m.adapters]


# -- the case matrix, shared by both directions ----------------------------------------------


@dataclass
class Case:
    id: str
    kind: str
    kwargs: dict = field(default_factory=dict)


B8 = dict(oft_block_size=8)
CASES = [
    Case("bert-default", "bert"),  # HF's default: blocks of 32 (one block on a 32-wide layer)
    Case("bert-modules-to-save", "bert", dict(target_modules=["query", "key", "value", "intermediate.dense"],
                                              modules_to_save=["classifier"], **B8)),
    Case("bert-r", "bert", dict(target_modules=["query", "value", "output.dense"], r=4, oft_block_size=0)),
    Case("bert-exact-cayley", "bert", dict(oft_block_size=16, use_cayley_neumann=False)),
    Case("bert-neumann-3", "bert", dict(num_cayley_neumann_terms=3, **B8)),
    Case("bert-coft", "bert", dict(coft=True, eps=1.0, **B8)),
    Case("bert-block-share", "bert", dict(block_share=True, **B8)),
    Case("bert-coft-block-share-exact", "bert", dict(coft=True, eps=2.0, block_share=True, use_cayley_neumann=False,
                                                    oft_block_size=4)),
    Case("bert-embedding", "bert", dict(target_modules=["word_embeddings", "query"], **B8)),
    Case("bert-layers", "bert", dict(target_modules=["query", "value", "dense"], layers_to_transform=[1],
                                     layers_pattern="layer", **B8)),
    Case("bert-bias-all", "bert", dict(bias="all", **B8)),
    Case("llama-default", "llama"),
    # module_dropout acts in training only: these eval-mode outputs must agree exactly.
    Case("llama-all-linear-r", "llama", dict(target_modules="all-linear", r=2, oft_block_size=0, module_dropout=0.3)),
    Case("conv-1x1", "convnet", dict(target_modules=["pw", "pw2", "fc"], modules_to_save=["head"], oft_block_size=3)),
]
CASE_IDS = [c.id for c in CASES]
MERGE_IDS = ["bert-r", "bert-exact-cayley", "bert-block-share", "bert-embedding", "llama-all-linear-r", "conv-1x1"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hf_adapter_loads_in_peftkit(case: Case, tmp_path) -> None:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    hf = peft.get_peft_model(build(), hf_config(case.kind, init_weights=False, **case.kwargs))
    assert perturb_trainable(hf) > 0
    hf.eval()
    hf.save_pretrained(tmp_path)

    model = peftkit.load(build(), tmp_path)
    assert peftkit.read_config(tmp_path).peft_type == "OFT"
    assert_same(run(model, inputs), run(hf, inputs), run(build(), inputs))


def _peftkit_adapted(case: Case, directory, **extra) -> tuple[nn.Module, torch.Tensor]:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    model = peftkit.apply(build(), OFTConfig(init_weights=False, **case.kwargs, **extra))
    assert perturb_trainable(model) > 0
    model.eval()
    peftkit.save(model, directory)
    return model, run(model, inputs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peftkit_adapter_loads_in_hf(case: Case, tmp_path) -> None:
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    _, want = _peftkit_adapted(case, tmp_path)
    hf = hf_from_pretrained(build(), tmp_path)
    assert hf.peft_config["default"].peft_type == peft.PeftType.OFT
    theirs = peft.get_peft_model_state_dict(hf)
    ours = load_file(tmp_path / WEIGHTS)
    # With bias="all" HF also lists its saved module's internal copies of the head's bias.
    extra = set(theirs) - set(ours)
    assert set(ours) <= set(theirs) and all(".modules_to_save." in k or ".original_module." in k for k in extra)
    assert not extra or case.kwargs.get("bias") == "all"
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key
    assert_same(run(hf, inputs), want, run(build(), inputs))


@pytest.mark.parametrize("case", [c for c in CASES if c.id in MERGE_IDS], ids=MERGE_IDS)
def test_peftkit_adapter_merged_in_hf(case: Case, tmp_path) -> None:
    """HF's merge_and_unload of a peftkit file equals the unmerged outputs, and peftkit's own
    merge gives the same base weights."""
    build, inputs = BUILD[case.kind], inputs_for(case.kind)
    model, want = _peftkit_adapted(case, tmp_path)
    merged = peft.PeftModel.from_pretrained(build(), tmp_path).merge_and_unload().eval()
    assert not any("oft_" in n for n, _ in merged.named_parameters())
    assert_same(run(merged, inputs), want)
    peftkit.unload(model, merge=True)
    ours, theirs = model.state_dict(), merged.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key


def test_hf_file_with_bias_oft_only_loads(tmp_path) -> None:
    """bias='oft_only' (the adapted layers' biases trained and saved) loads from HF PEFT's file."""
    inputs = inputs_for("bert")
    hf = peft.get_peft_model(tiny_bert(), hf_config("bert", init_weights=False, bias="oft_only", **B8))
    perturb_trainable(hf)
    hf.eval().save_pretrained(tmp_path)
    assert any(k.endswith("query.base_layer.bias") for k in load_file(tmp_path / WEIGHTS))
    model = peftkit.load(tiny_bert(), tmp_path)
    assert_same(run(model, inputs), run(hf, inputs), run(tiny_bert(), inputs))


# -- k x k convolutions: the rotated filter (HF PEFT's merge), not HF's unmerged forward --------

KXK = dict(target_modules=["conv", "pw", "fc"], modules_to_save=["head"], oft_block_size=3)


def test_kxk_conv_files_match_hf_merged_model(tmp_path) -> None:
    build, inputs = BUILD["convnet"], inputs_for("convnet")
    hf = peft.get_peft_model(build(), hf_config("convnet", init_weights=False, **KXK))
    perturb_trainable(hf)
    hf.eval().save_pretrained(tmp_path / "hf")
    ours = peftkit.load(build(), tmp_path / "hf")
    hf_merged = hf.merge_and_unload()
    assert_same(run(ours, inputs), run(hf_merged, inputs), run(build(), inputs))

    model, want = _peftkit_adapted(Case("kxk", "convnet", KXK), tmp_path / "pk")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "pk").merge_and_unload()
    assert_same(run(theirs, inputs), want, run(build(), inputs))
    peftkit.merge(model, probe=inputs["x"])
    assert_same(run(model, inputs), want)
    torch.testing.assert_close(model.conv.base_layer.weight, theirs.conv.weight, rtol=0, atol=1e-6)


def test_hf_unmerged_kxk_conv_is_not_the_rotation() -> None:
    """Why peftkit does not follow HF PEFT 0.21's unmerged Conv2d forward (stride-1 patches
    rotated and folded back, overlaps summed): for a 3x3 kernel it is not even the identity at
    init, and it differs from HF's own merge. If this starts failing, HF PEFT has changed it:
    revisit ``OFTConv2d``."""
    build, inputs = BUILD["convnet"], inputs_for("convnet")
    base = run(build(), inputs)
    hf = peft.get_peft_model(build(), hf_config("convnet", target_modules=["conv"], oft_block_size=3)).eval()
    assert (run(hf, inputs) - base).abs().max() > 1e-2
    ours = peftkit.apply(build(), OFTConfig(target_modules=["conv"], oft_block_size=3))
    assert torch.equal(run(ours, inputs), base)


# -- the files ---------------------------------------------------------------------------------

FILE_CASES = ["bert-default", "bert-r", "bert-coft", "bert-embedding", "bert-layers", "llama-all-linear-r", "conv-1x1"]


def _hf_adapted_names(hf) -> list[str]:
    from peft.tuners.oft.layer import OFTLayer

    prefix = "base_model.model."
    return sorted(n[len(prefix):] for n, m in hf.named_modules() if isinstance(m, OFTLayer))


@pytest.mark.parametrize("case", [c for c in CASES if c.id in FILE_CASES], ids=FILE_CASES)
def test_files_equal_what_hf_writes(case: Case, tmp_path) -> None:
    build = BUILD[case.kind]
    peftkit.save(peftkit.apply(build(), OFTConfig(**case.kwargs)), tmp_path / "pk")
    hf = peft.get_peft_model(build(), hf_config(case.kind, **case.kwargs))
    hf.save_pretrained(tmp_path / "hf")

    ours, theirs = load_file(tmp_path / "pk" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert (ours[key].shape, ours[key].dtype) == (theirs[key].shape, theirs[key].dtype), key
    assert any(k.endswith((".oft_R.weight", ".oft_embedding_R.weight")) for k in ours)

    mine = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    hfs = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert set(mine) == set(hfs) - {"auto_mapping"}
    assert mine["target_modules"] == _hf_adapted_names(hf)
    heads = {n for n, _ in build().named_modules()}
    assert set(mine["modules_to_save"] or []) & heads == set(hfs["modules_to_save"] or []) & heads
    for name in set(mine) - {"target_modules", "modules_to_save", "peft_version"}:
        assert mine[name] == hfs[name], name
    # The HF PEFT release whose OFT the file follows: HF reads no version as one older than 0.18
    # (another Cayley-Neumann series) and warns that the adapter must be retrained.
    assert mine["peft_version"] == "0.21.2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(build(), tmp_path / "pk")
    assert not [str(w.message) for w in caught if "cayley-neumann" in str(w.message)]
    read = peft.OFTConfig.from_pretrained(tmp_path / "pk")
    for name in ("r", "oft_block_size", "module_dropout", "coft", "eps", "block_share", "use_cayley_neumann",
                 "num_cayley_neumann_terms", "init_weights", "bias", "fan_in_fan_out", "layers_to_transform",
                 "layers_pattern", "task_type"):
        assert getattr(read, name) == mine[name], name


def test_tensor_keys_and_shapes() -> None:
    model = peftkit.apply(BUILD["convnet"](), OFTConfig(target_modules=["conv", "pw", "fc"], oft_block_size=3))
    shapes = {k: tuple(v.shape) for k, v in peftkit.io.adapter_tensors(model, "default").items()}
    p = "base_model.model."
    # (blocks, b(b-1)/2): conv 4·3·3 = 36 -> 12 blocks of 3; pw 6 -> 2; fc 36 -> 12.
    assert shapes == {f"{p}conv.oft_R.weight": (12, 3), f"{p}pw.oft_R.weight": (2, 3), f"{p}fc.oft_R.weight": (12, 3)}

    def rotation_shapes(config):
        tensors = peftkit.io.adapter_tensors(peftkit.apply(tiny_bert(), config), "default")
        return {tuple(t.shape) for k, t in tensors.items() if k.endswith("oft_R.weight")}

    assert rotation_shapes(OFTConfig(block_share=True, oft_block_size=8)) == {(1, 28)}
    assert rotation_shapes(OFTConfig(r=4, oft_block_size=0)) == rotation_shapes(OFTConfig(oft_block_size=8)) == {(4, 28)}


# -- the rotation -------------------------------------------------------------------------------


def _unit(dim: int = 12, **kwargs):
    model = nn.Sequential(nn.Linear(dim, 5))
    torch.manual_seed(1)
    peftkit.apply(model, OFTConfig(target_modules=["0"], init_weights=False, **kwargs))
    return model, model[0], model[0].adapters["default"]


def _skew_by_hand(vector: torch.Tensor, b: int) -> torch.Tensor:
    """The strict upper triangle filled row by row, minus its transpose."""
    s = torch.zeros(b, b, dtype=vector.dtype)
    k = 0
    for i in range(b):
        for j in range(i + 1, b):
            s[i, j] = vector[k]
            k += 1
    return s - s.T


def test_exact_cayley_is_a_rotation_in_cayley_form() -> None:
    _, _, unit = _unit(oft_block_size=4, use_cayley_neumann=False)
    blocks = unit.blocks().detach()
    assert blocks.shape == (3, 4, 4)
    eye = torch.eye(4)
    for i, r in enumerate(blocks):
        torch.testing.assert_close(r.T @ r, eye, rtol=0, atol=1e-5)
        assert abs(torch.linalg.det(r).item() - 1.0) < 1e-5  # SO(b): never a reflection
        q = _skew_by_hand(unit.oft_R[i].detach(), 4)
        torch.testing.assert_close(r, (eye - q) @ torch.linalg.inv(eye + q), rtol=0, atol=1e-5)
        torch.testing.assert_close((eye - r) @ torch.linalg.inv(eye + r), q, rtol=0, atol=1e-5)  # Q back from R
        assert not torch.allclose(r, eye, atol=1e-2)
    full = unit.matrix()
    torch.testing.assert_close(full.T @ full, torch.eye(12), rtol=0, atol=1e-5)


def test_cayley_neumann_follows_hf_coefficients() -> None:
    assert neumann_powers(1) == []
    assert neumann_powers(2) == [(1, 2.0)]
    assert neumann_powers(3) == neumann_powers(4) == [(1, 2.0), (2, 2.0), (3, 1.0)]  # HF: 3 and 4 are alike
    assert neumann_powers(5) == [(1, 2.0), (2, 2.0), (3, 2.0), (4, 1.0)]
    _, _, unit = _unit(oft_block_size=4)  # HF's default: 5 terms
    q = _skew_by_hand(unit.oft_R[0].detach(), 4)
    eye = torch.eye(4)
    by_hand = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    torch.testing.assert_close(unit.blocks()[0].detach(), by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize("terms", [5, 9])
def test_cayley_neumann_approaches_the_transposed_exact_rotation(terms) -> None:
    """The series is that of (I + Q)(I − Q)⁻¹ = ((I − Q)(I + Q)⁻¹)ᵀ; nearly orthogonal for a small Q."""
    _, _, exact = _unit(oft_block_size=4, use_cayley_neumann=False)
    _, _, series = _unit(oft_block_size=4, num_cayley_neumann_terms=terms)
    with torch.no_grad():
        exact.oft_R.mul_(0.1)
        series.oft_R.copy_(exact.oft_R)
    r, e = series.blocks().detach(), exact.blocks().detach()
    gap = (r - e.transpose(-2, -1)).abs().max().item()
    off = (r.transpose(-2, -1) @ r - torch.eye(4)).abs().max().item()
    assert gap < (1e-3 if terms == 5 else 1e-6) and off < (1e-3 if terms == 5 else 1e-6), (gap, off)


def test_linear_forward_and_merge_against_the_block_diagonal_matrix() -> None:
    model, host, unit = _unit(dim=12, r=3, oft_block_size=0)
    x = torch.randn(2, 3, 12)
    w, b = host.base_layer.weight.detach().clone(), host.base_layer.bias.detach().clone()
    m = unit.matrix()
    assert m.shape == (12, 12) and torch.count_nonzero(m[:4, 4:]) == 0 and torch.count_nonzero(m[4:8, 8:]) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), (x @ m) @ w.T + b, rtol=0, atol=1e-5)  # rows rotated: base(x R)
        want = model(x)
        peftkit.merge(model, probe=x)
        torch.testing.assert_close(host.base_layer.weight, w @ m.T, rtol=0, atol=1e-6)  # W' = W Rᵀ
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
        peftkit.unmerge(model)
    assert torch.equal(host.base_layer.weight, w)  # the original, bit for bit


def test_block_share_uses_one_block_everywhere() -> None:
    model, host, unit = _unit(dim=12, oft_block_size=4, block_share=True)
    assert unit.oft_R.shape == (1, 6)
    m = unit.matrix()
    assert torch.equal(m[:4, :4], m[4:8, 4:8]) and torch.equal(m[:4, :4], m[8:, 8:])
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), host.base_layer(x @ m), rtol=0, atol=1e-6)


def test_conv_forward_is_one_convolution_with_the_rotated_filter() -> None:
    model = BUILD["convnet"]()
    peftkit.apply(model, OFTConfig(target_modules=["conv", "pw2"], oft_block_size=3, init_weights=False))
    x = torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        for name, host in (("conv", model.conv), ("pw2", model.pw2)):
            conv, unit = host.base_layer, host.adapters["default"]
            m = unit.matrix()
            filt = (conv.weight.reshape(conv.out_channels, -1) @ m.T).view_as(conv.weight)
            inp = torch.randn(2, conv.in_channels, 8, 8)
            want = F.conv2d(inp, filt, conv.bias, conv.stride, conv.padding)
            torch.testing.assert_close(host(inp), want, rtol=0, atol=1e-5)
        # A 1x1 conv: the same as rotating each pixel's channels first (HF PEFT's input-side form).
        conv, unit = model.pw2.base_layer, model.pw2.adapters["default"]
        rotated = (x.permute(0, 2, 3, 1) @ unit.matrix()).permute(0, 3, 1, 2)
        torch.testing.assert_close(model.pw2(x), conv(rotated), rtol=0, atol=1e-5)


def test_conv_padding_mode_follows_the_base_layer() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    peftkit.apply(model, OFTConfig(target_modules=["0"], oft_block_size=6, init_weights=False))
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        want = model(x)
        conv, unit = model[0].base_layer, model[0].adapters["default"]
        filt = (conv.weight.reshape(3, -1) @ unit.matrix().T).view_as(conv.weight)
        torch.testing.assert_close(want, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), filt, conv.bias),
                                   rtol=0, atol=1e-5)
        peftkit.merge(model, probe=x)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)


def test_identity_at_init_on_every_layer_type() -> None:
    inputs = inputs_for("convnet")
    model = peftkit.apply(BUILD["convnet"](), OFTConfig(target_modules=["conv", "pw", "pw2", "fc"], oft_block_size=3))
    assert torch.equal(run(model, inputs), run(BUILD["convnet"](), inputs))
    bert = peftkit.apply(tiny_bert(), OFTConfig(target_modules=["word_embeddings", "query"], oft_block_size=8))
    assert torch.equal(run(bert, model_inputs("bert")), run(tiny_bert(), model_inputs("bert")))
    assert all(not u.oft_R.any() for u in oft_units(bert))
    for unit in oft_units(bert):
        assert torch.equal(unit.matrix(), torch.eye(unit.dim))


def test_coft_keeps_each_block_within_its_radius() -> None:
    model, host, unit = _unit(dim=12, oft_block_size=4, coft=True, eps=0.3)
    radius = 0.3 / 3 ** 0.5  # eps / √(stored blocks)
    with torch.no_grad():
        unit.oft_R[1].mul_(1e-3)  # inside the ball: left alone
        inside = unit.oft_R[1].clone()
    model.train()
    opt = torch.optim.SGD([unit.oft_R], lr=1.0)
    x, y = torch.randn(8, 12), torch.randn(8, 5)
    for step in range(3):
        loss = F.mse_loss(model(x), y)  # the forward projects first (HF PEFT: in place, without gradient)
        norms = [torch.linalg.matrix_norm(unit.skew(unit.oft_R.detach())[i]).item() for i in range(3)]
        assert max(norms) <= radius * (1 + 1e-5), (norms, radius)
        if step == 0:
            assert torch.equal(unit.oft_R[1].detach(), inside)
            assert norms[0] == pytest.approx(radius, rel=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_module_dropout_sets_blocks_to_the_identity_in_training_only() -> None:
    model, host, unit = _unit(dim=16, oft_block_size=4, module_dropout=0.5)
    x = torch.randn(6, 16)
    eye = torch.eye(4)
    with torch.no_grad():
        model.eval()
        assert torch.equal(unit.blocks(), unit.blocks(dropout=False))
        seen = set()
        for _ in range(8):
            r = unit.blocks(dropout=True)  # what a training-mode forward uses
            identity = tuple(bool(torch.equal(b, eye)) for b in r)
            assert sum(identity) == 2  # ⌊0.5 · 4⌋ blocks, the rest rotated
            seen.add(identity)
        assert len(seen) > 1  # chosen afresh each call
        model.train()
        outs = {tuple(model(x).flatten().tolist()) for _ in range(6)}
        assert len(outs) > 1
        model.eval()
        torch.testing.assert_close(model(x), host.base_layer(x @ unit.matrix()), rtol=0, atol=1e-6)
    _, _, shared = _unit(dim=16, oft_block_size=4, module_dropout=0.5, block_share=True)
    assert not torch.equal(shared.blocks(dropout=True)[0], eye)  # one stored block: never dropped (HF)


def test_bfloat16_base_gets_float32_vectors() -> None:
    inputs = model_inputs("llama")
    model = tiny_llama().to(torch.bfloat16)
    peftkit.apply(model, OFTConfig(init_weights=False, oft_block_size=8))
    unit = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert unit.oft_R.dtype == torch.float32
    want = run(model, inputs)
    assert want.dtype == torch.bfloat16
    peftkit.unload(model, merge=True)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(run(model, inputs), want, rtol=0.05, atol=0.05)


# -- composition ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [["lo", "oft"], ["oft", "lo"]])
def test_oft_and_lora_compose_on_the_same_and_other_layers(order, tmp_path) -> None:
    """LoRA on fc1, OFT on fc1 and fc2: fc1 = W1 (x R1) + b1 + s·B A x (OFT rotates the base layer's
    input only), fc2 = W2 (h R2) + b2; merged equals unmerged whatever the active order."""
    x = inputs_for("mlp")["x"]
    model = BUILD["mlp"]()
    w1, b1, w2, b2 = (t.detach().clone() for t in (model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias))
    peftkit.apply(model, peftkit.LoraConfig(r=2, lora_alpha=6, target_modules=["fc1"], init_lora_weights=False),
                  name="lo")
    peftkit.apply(model, OFTConfig(target_modules=["fc1", "fc2"], oft_block_size=4, init_weights=False), name="oft")
    perturb_trainable(model)  # only "oft" is trainable now
    peftkit.set_active(model, order)
    lora, r1, r2 = model.fc1.adapters["lo"], model.fc1.adapters["oft"].matrix(), model.fc2.adapters["oft"].matrix()
    with torch.no_grad():
        h = torch.relu((x @ r1) @ w1.T + b1 + 3.0 * x @ (lora.lora_B @ lora.lora_A).T)
        expected = (h @ r2) @ w2.T + b2
    both = run(model, {"x": x})
    assert_same(both, expected)
    peftkit.set_active(model, "oft")
    with torch.no_grad():
        only = (torch.relu((x @ r1) @ w1.T + b1) @ r2) @ w2.T + b2
    assert_same(run(model, {"x": x}), only)
    assert (both - only).abs().max() > 1e-3
    peftkit.set_active(model, order)
    peftkit.merge(model, probe=x)
    assert_same(run(model, {"x": x}), expected)
    peftkit.unmerge(model)
    assert torch.allclose(model.fc1.base_layer.weight, w1, atol=1e-6)
    assert torch.equal(model.fc2.base_layer.weight, w2)

    # Files of each adapter, loaded together again, give the same composition.
    peftkit.save(model, tmp_path / "lo", name="lo")
    peftkit.save(model, tmp_path / "oft", name="oft")
    fresh = BUILD["mlp"]()
    peftkit.load(fresh, tmp_path / "oft", name="oft")
    peftkit.load(fresh, tmp_path / "lo", name="lo")
    peftkit.set_active(fresh, order)
    assert_same(run(fresh, {"x": x}), expected)
    peftkit.unload(fresh)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in MLP().modules()]


def test_one_rotation_per_layer() -> None:
    """Two OFT adapters (or OFT and DoRA) cannot be active on one layer: each rotates or rescales
    the base layer itself (``runs_first``); the rest of the model may still carry both."""
    model = BUILD["mlp"]()
    peftkit.apply(model, OFTConfig(target_modules=["fc1"], oft_block_size=4), name="a")
    peftkit.apply(model, OFTConfig(target_modules=["fc1"], oft_block_size=2), name="b")
    with pytest.raises(peftkit.ModelError, match="cannot be active together on one layer"):
        peftkit.set_active(model, ["a", "b"])
    peftkit.apply(model, peftkit.LoraConfig(r=2, target_modules=["fc1"], use_dora=True), name="dora")
    with pytest.raises(peftkit.ModelError, match="cannot be active together on one layer"):
        peftkit.set_active(model, ["a", "dora"])
    peftkit.apply(model, OFTConfig(target_modules=["fc2"], oft_block_size=4), name="c")
    peftkit.set_active(model, ["a", "c"])  # different layers: fine


def test_oft_with_ia3_input_scaling_on_one_layer_merges_exactly() -> None:
    model = nn.Sequential(nn.Linear(8, 6))
    peftkit.apply(model, peftkit.IA3Config(target_modules=["0"], feedforward_modules=["0"], init_ia3_weights=False),
                  name="ia3")
    peftkit.apply(model, OFTConfig(target_modules=["0"], oft_block_size=4, init_weights=False), name="oft")
    peftkit.set_active(model, ["ia3", "oft"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
        peftkit.merge(model, probe=x)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(r=4), "r, oft_block_size: expected exactly one of them non-zero"),
    (dict(r=0, oft_block_size=0), "found r=0 and oft_block_size=0"),
    (dict(r=-1, oft_block_size=0), "r: expected a non-negative integer"),
    (dict(oft_block_size=2.5), "oft_block_size: expected a non-negative integer"),
    (dict(oft_block_size=True), "oft_block_size: expected a non-negative integer"),
    (dict(oft_block_size=1), "oft_block_size: expected 0 or an integer of at least 2"),
    (dict(module_dropout=1.0), "module_dropout: expected a number in [0.0, 1.0), found 1.0"),
    (dict(module_dropout="0.1"), "module_dropout: expected a number"),
    (dict(coft="yes"), "coft: expected true or false, found 'yes'"),
    (dict(block_share=1), "block_share: expected true or false"),
    (dict(use_cayley_neumann=None), "use_cayley_neumann: expected true or false"),
    (dict(init_weights="gaussian"), "init_weights: expected true or false"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out: expected false"),
    (dict(bias="lora_only"), "bias: expected 'none', 'all' or 'oft_only', found 'lora_only'"),
    (dict(eps=0), "eps: expected a positive number"),
    (dict(eps=float("inf")), "eps: expected a finite number"),
    (dict(num_cayley_neumann_terms=0), "num_cayley_neumann_terms: expected a positive integer, found 0"),
    (dict(num_cayley_neumann_terms=10**6), "num_cayley_neumann_terms: expected a positive integer of at most 100"),
    (dict(layers_pattern="layer"), "layers_pattern: expected layers_to_transform"),
    (dict(target_modules=3), "target_modules: expected a list of module names or a regex"),
])
def test_bad_config_values(kwargs, fragment) -> None:
    with pytest.raises(peftkit.ConfigError) as info:
        OFTConfig(**kwargs)
    assert fragment in str(info.value)


def test_config_from_file_refuses_what_it_does_not_know() -> None:
    data = OFTConfig(r=4, oft_block_size=0).to_dict()
    assert data["peft_type"] == "OFT" and registry.config_from_dict(data) == OFTConfig(r=4, oft_block_size=0)
    with pytest.raises(peftkit.ConfigError, match="unknown field 'lora_alpha' = 16 for OFT"):
        registry.config_from_dict({**data, "lora_alpha": 16}, source="adapter_config.json")
    with pytest.raises(peftkit.ConfigError, match="adapter_config.json: r, oft_block_size: expected exactly one"):
        registry.config_from_dict({**data, "oft_block_size": 32}, source="adapter_config.json")
    registry.config_from_dict({**data, "peft_version": "0.21.2", "auto_mapping": None})
    assert registry.config_from_dict({**data, "bias": "oft_only"}).bias == "oft_only"


def test_the_size_hf_would_substitute_is_named_correctly() -> None:
    """The error for a non-divisor names HF PEFT's substitute (its ``adjust_oft_parameters``)."""
    from peft.tuners.oft.layer import OFTLayer

    for dim in (6, 27, 32, 36, 384):
        for value in range(1, dim + 4):
            assert nearest_divisor(dim, value) == OFTLayer.adjust_oft_parameters(None, dim, value), (dim, value)


@pytest.mark.parametrize("kind, config, fragments", [
    ("gpt2", OFTConfig(), ["'transformer.h.0.attn.c_attn'", "Conv1D", "HF PEFT's OFT does not support it",
                           "supported: Linear, Conv2d, Embedding"]),
    ("bert", OFTConfig(target_modules=["LayerNorm"]), ["type LayerNorm", "supported: Linear, Conv2d, Embedding"]),
    ("bert", OFTConfig(target_modules=["attention"]), ["'bert.encoder.layer.0.attention'", "type BertAttention"]),
    ("bert", OFTConfig(r=3, oft_block_size=0), ["'bert.encoder.layer.0.attention.self.query'", "in_features 32",
                                                "r: expected a divisor of its input dimension 32, found 3",
                                                "HF PEFT would silently use 2"]),
    ("bert", OFTConfig(r=32, oft_block_size=0), ["r: expected at most 16 blocks", "found 32"]),
    ("bert", OFTConfig(oft_block_size=48), ["oft_block_size: expected a divisor of its input dimension 32, found 48",
                                            "would silently use 32"]),
    ("convnet", OFTConfig(target_modules=["conv"]), ["'conv'", "in_channels 4 x kernel 3x3 = 36",
                                                     "oft_block_size: expected a divisor", "found 32",
                                                     "would silently use 36"]),
])
def test_unsupported_layers_and_sizes_are_refused_and_change_nothing(kind, config, fragments) -> None:
    model = BUILD[kind]()
    keys = list(model.state_dict())
    with pytest.raises(peftkit.ConfigError) as info:
        peftkit.apply(model, config)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


@pytest.mark.parametrize("layer, fragment", [
    (nn.Conv2d(4, 4, 3, groups=2), "groups=2 is not supported"),
    (nn.Conv2d(4, 4, 3, dilation=2), "dilation=(2, 2) is not supported"),
    (nn.Conv2d(4, 4, (3, 1)), "a non-square kernel is not supported"),
    (nn.Conv1d(4, 4, 3), "'0' of type Conv1d; supported: Linear, Conv2d, Embedding"),
    (nn.Conv3d(4, 4, 1), "'0' of type Conv3d; supported"),
    (nn.ConvTranspose2d(4, 4, 1), "'0' of type ConvTranspose2d; supported"),
])
def test_other_torch_layers_are_refused(layer, fragment) -> None:
    with pytest.raises(peftkit.ConfigError) as info:
        peftkit.apply(nn.Sequential(layer), OFTConfig(target_modules=["0"], oft_block_size=4))
    assert fragment in str(info.value)


def test_bias_oft_only_trains_the_adapted_layers_biases_only() -> None:
    model = peftkit.apply(tiny_bert(), OFTConfig(bias="oft_only", oft_block_size=8))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    adapted = set(peftkit.adapted_modules(model))
    assert trained and all(any(n.startswith(a + ".") for a in adapted) for n in trained if "classifier" not in n)


# -- the trainer ------------------------------------------------------------------------------


def test_cli_train_writes_an_adapter_hf_loads(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tiny_model = save_tiny_bert(tmp_path / "tiny-bert")
    train, _ = write_topic_files(tmp_path)
    out = tmp_path / "run"
    result = invoke("train", "--method", "oft", "--model", tiny_model, "--data", train, "--max-steps", 3,
                    "--batch-size", 4, "--r", 4, "--targets", "query,value,dense", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["oft_block_size"]) == (4, 0)  # --r is HF's r: blocks per layer
    assert "classifier" in config["modules_to_save"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "oft" and summary["options"]["lr"] == registry.get("OFT").cli[0].defaults["lr"]
    assert "OFT" in invoke("info", out).stdout

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    inputs = dict(tokenizer(["the cat plays piano", "interest on savings"], padding=True, return_tensors="pt"))

    def base():
        return AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3,
                                                                  ignore_mismatched_sizes=True).eval()

    ours = peftkit.load(base(), adapter)
    theirs = peft.PeftModel.from_pretrained(base(), adapter).eval()
    assert theirs.peft_config["default"].peft_type == peft.PeftType.OFT
    assert_same(run(theirs, inputs), run(ours, inputs))
    tensors = load_file(adapter / WEIGHTS)
    assert any(k.endswith("oft_R.weight") and v.any() for k, v in tensors.items())  # the rotations trained
    # --alpha and --dropout are not OFT's
    bad = invoke("train", "--method", "oft", "--alpha", 4, "--model", tiny_model, "--data", train,
                 "--max-steps", 1, "--out", tmp_path / "nope")
    assert bad.exit_code != 0 and "--alpha does not apply to --method oft" in bad.output

"""Hot-swapping LoRA adapters in place (``peftkit.prepare_hotswap`` / ``peftkit.hotswap``).

Every adapter file is written from a base built with the same seed, with ``init_lora_weights=False``
and every trainable tensor perturbed, so that a tensor copied into the wrong place, a stale
scaling or a padding that is not zero changes the outputs. The reference for a swap is always a
fresh base with the second file loaded by ``peftkit.load``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.layer import AdapterLayer
from peftkit.methods.lora import LoraUnit
from peftkit.state import hosts

from conftest import model_inputs, tiny_bert, tiny_gpt2, tiny_llama
from interop_helpers import assert_same, hf_from_pretrained, perturb_trainable, run

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class ConvNet(nn.Module):
    """Not a transformers model: Conv2d, Embedding and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.conv = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)  # (B, 6, 4, 4)
        self.fc = nn.Linear(6 * 4 * 4 + 8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.conv(image)).flatten(1), self.emb(tokens).mean(1)], dim=-1)
        return self.head(F.relu(self.fc(h)))


def conv_inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"image": torch.randn(2, 3, 8, 8, generator=g), "tokens": torch.randint(0, 50, (2, 5), generator=g)}


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    first: dict[str, Any]  # LoraConfig arguments of the loaded adapter
    second: dict[str, Any]  # ... of the file swapped in
    max_rank: int
    kinds: tuple[type, ...] = field(default=())  # layer types the case must exercise


LLAMA_QV = ["q_proj", "v_proj"]
CASES = [
    Case("llama-linear", tiny_llama, lambda: model_inputs("llama"),
         dict(r=4, lora_alpha=7, target_modules=LLAMA_QV), dict(r=8, lora_alpha=20, target_modules=LLAMA_QV), 8,
         (nn.Linear,)),
    Case("llama-embedding", tiny_llama, lambda: model_inputs("llama"),
         dict(r=3, lora_alpha=5, target_modules=["embed_tokens", "q_proj"]),
         dict(r=6, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]), 6, (nn.Embedding, nn.Linear)),
    Case("llama-patterns-rslora", tiny_llama, lambda: model_inputs("llama"),
         dict(r=4, lora_alpha=8, target_modules=LLAMA_QV, use_rslora=True, alpha_pattern={"v_proj": 3}),
         dict(r=2, lora_alpha=16, target_modules=LLAMA_QV, use_rslora=True, alpha_pattern={"v_proj": 3},
              rank_pattern={"q_proj": 10}), 12, (nn.Linear,)),
    Case("gpt2-conv1d", tiny_gpt2, lambda: model_inputs("gpt2"),
         dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"]),
         dict(r=5, lora_alpha=3, target_modules=["c_attn", "c_proj"]), 5),
    Case("bert-head", lambda: tiny_bert(), lambda: model_inputs("bert"),  # classifier: modules_to_save
         dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
         dict(r=2, lora_alpha=6, target_modules=["query", "value"]), 4, (nn.Linear,)),
    Case("conv2d-embedding", ConvNet, conv_inputs,
         dict(r=2, lora_alpha=3, target_modules=["conv", "emb", "fc"]),
         dict(r=4, lora_alpha=10, target_modules=["conv", "emb", "fc"]), 4, (nn.Conv2d, nn.Embedding, nn.Linear)),
    Case("llama-dora", tiny_llama, lambda: model_inputs("llama"),
         dict(r=4, lora_alpha=7, target_modules=LLAMA_QV, use_dora=True),
         dict(r=6, lora_alpha=5, target_modules=LLAMA_QV, use_dora=True), 6),
]


def write_adapter(directory, build: Callable[[], nn.Module], seed: int, **config: Any) -> str:
    """An adapter of ``config`` trained (perturbed) on a fresh base, saved to ``directory``."""
    model = build()
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False, **config))
    assert perturb_trainable(model, seed=seed) > 0
    peftkit.save(model, directory)
    return os.fspath(directory)


def fresh(build: Callable[[], nn.Module], directory) -> nn.Module:
    model = build()
    peftkit.load(model, directory)
    return model


def lora_units(model: nn.Module, name: str = "default") -> dict[str, LoraUnit]:
    return {p: h.adapters[name] for p, h in hosts(model) if isinstance(h, AdapterLayer) and name in h.adapters}


def pair(unit: LoraUnit) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(unit, "lora_embedding_A"):
        return unit.lora_embedding_A, unit.lora_embedding_B
    return unit.lora_A, unit.lora_B


def snapshot(model: nn.Module) -> dict:
    """Everything a swap may change: every tensor, the units' ranks and scalings, the configs."""
    state = model._peftkit
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "units": {(n, p): (u.r, float(u.scaling), type(u.scaling)) for n in state.configs
                  for p, u in lora_units(model, n).items()},
        "configs": {n: c.to_dict() for n, c in state.configs.items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["units"] == before["units"]
    assert after["configs"] == before["configs"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


# -- swaps compute what a fresh load computes ----------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_swap_equals_fresh_load(case: Case, tmp_path) -> None:
    first = write_adapter(tmp_path / "first", case.build, 1, **case.first)
    second = write_adapter(tmp_path / "second", case.build, 2, **case.second)
    inputs = case.inputs()
    model = fresh(case.build, first)
    want_first = run(model, inputs)
    units = lora_units(model)
    kinds = {type(h.base_layer) for _, h in hosts(model) if isinstance(h, AdapterLayer)}
    for kind in case.kinds:
        assert any(issubclass(k, kind) for k in kinds), (case.id, kind, kinds)

    peftkit.prepare_hotswap(model, case.max_rank)
    assert_same(run(model, inputs), want_first, atol=1e-6)  # padding changes no output
    for unit in units.values():  # the module's unit objects are the same, their tensors padded
        a, b = pair(unit)
        assert a.shape[0] == case.max_rank and b.shape[1] == case.max_rank
        assert "scaling" in unit._buffers and unit.scaling.dim() == 0

    peftkit.hotswap(model, second, "default")
    want_second = run(fresh(case.build, second), inputs)
    assert_same(run(model, inputs), want_second, base=want_first)
    assert lora_units(model).keys() == units.keys() and all(lora_units(model)[p] is u for p, u in units.items())

    peftkit.hotswap(model, first, "default")  # back, through the padding region cleared again
    assert_same(run(model, inputs), want_first, base=want_second)


def test_prepare_hotswap_pads_with_zeros_and_keeps_keys(tmp_path) -> None:
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=3, lora_alpha=5, target_modules=LLAMA_QV)
    model = fresh(tiny_llama, first)
    peftkit.set_active(model, "default")
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    originals = {p: tuple(t.detach().clone() for t in pair(u)) for p, u in lora_units(model).items()}
    peftkit.save(model, tmp_path / "before")
    peftkit.prepare_hotswap(model, 8)
    assert model.state_dict().keys() == keys.keys()  # no scaling key: the buffer is not persistent
    for path, unit in lora_units(model).items():
        a, b = pair(unit)
        a0, b0 = originals[path]
        assert unit.r == 3 and a.shape == (8, *a0.shape[1:]) and b.shape == (b0.shape[0], 8)
        assert torch.equal(a[:3], a0) and torch.equal(b[:, :3], b0)
        assert not a[3:].any() and not b[:, 3:].any()
        assert not a.requires_grad and not b.requires_grad  # loaded without trainable=True: kept
        assert unit.scaling.item() == pytest.approx(5 / 3) and unit.scaling.dtype == a.dtype
    model.double()  # .to() moves and casts the scaling with the parameters
    assert all(u.scaling.dtype == torch.float64 for u in lora_units(model).values())
    model.float()
    # save after prepare writes the unpadded adapter: the same file as before
    peftkit.save(model, tmp_path / "after")
    before, after = load_file(tmp_path / "before" / WEIGHTS), load_file(tmp_path / "after" / WEIGHTS)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with open(tmp_path / "after" / CONFIG) as f:
        assert json.load(f)["r"] == 3


def test_prepare_keeps_requires_grad_and_training_keeps_the_padding_zero(tmp_path) -> None:
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=2, lora_alpha=4, target_modules=LLAMA_QV)
    model = tiny_llama()
    peftkit.load(model, first, trainable=True)
    peftkit.prepare_hotswap(model, 6)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * len(lora_units(model)) and all(p.shape[0] == 6 or p.shape[1] == 6 for p in params)
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    inputs = model_inputs("llama")
    for _ in range(2):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for unit in lora_units(model).values():
        assert unit.lora_B[:, :2].abs().sum() > 0  # trained
        assert not unit.lora_A[2:].any() and not unit.lora_B[:, 2:].any()
    peftkit.save(model, tmp_path / "trained")
    assert_same(run(fresh(tiny_llama, tmp_path / "trained"), inputs), run(model, inputs))


def test_prepare_hotswap_again_repads(tmp_path) -> None:
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=3, lora_alpha=5, target_modules=LLAMA_QV)
    inputs = model_inputs("llama")
    model = fresh(tiny_llama, first)
    want = run(model, inputs)
    peftkit.prepare_hotswap(model, 8)
    peftkit.prepare_hotswap(model, 4)  # down to 4, still above the rank 3
    assert all(pair(u)[0].shape[0] == 4 for u in lora_units(model).values())
    assert_same(run(model, inputs), want, atol=1e-6)


# -- modules the file leaves out ---------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_modules_the_file_leaves_out_become_identity(dora: bool, tmp_path) -> None:
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=4, lora_alpha=7, target_modules=LLAMA_QV, use_dora=dora)
    q_only = write_adapter(tmp_path / "q", tiny_llama, 2, r=2, lora_alpha=3, target_modules=["q_proj"], use_dora=dora)
    inputs = model_inputs("llama")
    model = fresh(tiny_llama, first)
    want_first = run(model, inputs)
    peftkit.prepare_hotswap(model, 4)
    peftkit.hotswap(model, q_only, "default")
    want = run(fresh(tiny_llama, q_only), inputs)
    assert_same(run(model, inputs), want, base=want_first)
    for path, unit in lora_units(model).items():
        if "v_proj" in path:
            assert not unit.lora_A.any() and not unit.lora_B.any()
    # save afterwards: the left-out modules are written as zeros, and the file reloads (peftkit and HF)
    peftkit.save(model, tmp_path / "saved")
    with open(tmp_path / "saved" / CONFIG) as f:
        data = json.load(f)
    assert (data["r"], data["lora_alpha"]) == (2, 3)
    assert any("v_proj" in t for t in data["target_modules"])
    assert_same(run(fresh(tiny_llama, tmp_path / "saved"), inputs), want)
    assert_same(run(hf_from_pretrained(tiny_llama(), tmp_path / "saved"), inputs), want)


def test_left_out_layers_keep_the_loaded_selection(tmp_path) -> None:
    """A file restricted by ``layers_to_transform``: the stored config keeps the loaded adapter's
    selection (which the zero-filled layers belong to), so the saved directory reloads."""
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=4, lora_alpha=7, target_modules=LLAMA_QV)
    layer0 = write_adapter(tmp_path / "layer0", tiny_llama, 2, r=2, lora_alpha=3, target_modules=LLAMA_QV,
                           layers_to_transform=[0])
    inputs = model_inputs("llama")
    model = fresh(tiny_llama, first)
    peftkit.prepare_hotswap(model, 4)
    peftkit.hotswap(model, layer0, "default")
    want = run(fresh(tiny_llama, layer0), inputs)
    assert_same(run(model, inputs), want)
    stored = model._peftkit.configs["default"]
    assert stored.layers_to_transform is None and (stored.r, stored.lora_alpha) == (2, 3)
    peftkit.save(model, tmp_path / "saved")
    assert_same(run(fresh(tiny_llama, tmp_path / "saved"), inputs), want)
    assert_same(run(hf_from_pretrained(tiny_llama(), tmp_path / "saved"), inputs), want)


# -- files written after prepare / after a swap --------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_save_after_swap_reloads_in_peftkit_and_hf(case: Case, tmp_path) -> None:
    first = write_adapter(tmp_path / "first", case.build, 1, **case.first)
    second = write_adapter(tmp_path / "second", case.build, 2, **case.second)
    inputs = case.inputs()
    model = fresh(case.build, first)
    want_first = run(model, inputs)
    peftkit.prepare_hotswap(model, case.max_rank)
    peftkit.save(model, tmp_path / "prepared")  # HF PEFT loads what save writes after prepare_hotswap
    assert_same(run(hf_from_pretrained(case.build(), tmp_path / "prepared"), inputs), want_first)

    peftkit.hotswap(model, second, "default")
    peftkit.save(model, tmp_path / "swapped")
    stored = model._peftkit.configs["default"]
    with open(tmp_path / "swapped" / CONFIG) as f:
        data = json.load(f)
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert data[key] == (case.second.get(key, {}) if "pattern" in key else case.second[key]), key
    assert stored.base_model_name_or_path == peftkit.read_config(second).base_model_name_or_path
    saved, original = load_file(tmp_path / "swapped" / WEIGHTS), load_file(os.path.join(second, WEIGHTS))
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    want = run(fresh(case.build, second), inputs)
    assert_same(run(fresh(case.build, tmp_path / "swapped"), inputs), want, base=want_first)
    assert_same(run(hf_from_pretrained(case.build(), tmp_path / "swapped"), inputs), want)


def test_swap_in_a_file_hf_peft_wrote(tmp_path) -> None:
    import peft

    targets = ["embed_tokens", "q_proj", "v_proj"]
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=3, lora_alpha=5, target_modules=targets)
    hf = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=6, lora_alpha=9, target_modules=targets,
                                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    perturb_trainable(hf, seed=2)
    hf.save_pretrained(tmp_path / "hf", save_embedding_layers=True)  # with the base embedding weight
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "hf" / WEIGHTS)
    inputs = model_inputs("llama")
    model = fresh(tiny_llama, first)
    want_first = run(model, inputs)
    peftkit.prepare_hotswap(model, 6)
    peftkit.hotswap(model, tmp_path / "hf", "default")
    assert_same(run(model, inputs), run(hf, inputs), base=want_first)
    assert_same(run(model, inputs), run(fresh(tiny_llama, tmp_path / "hf"), inputs))


# -- without prepare_hotswap -----------------------------------------------------------------


def test_identical_rank_and_scaling_swap_without_prepare(tmp_path) -> None:
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=4, lora_alpha=8, target_modules=LLAMA_QV)
    second = write_adapter(tmp_path / "second", tiny_llama, 2, r=4, lora_alpha=8, target_modules=LLAMA_QV)
    inputs = model_inputs("llama")
    model = fresh(tiny_llama, first)
    want_first = run(model, inputs)
    params = {p: pair(u) for p, u in lora_units(model).items()}
    peftkit.hotswap(model, second, "default")
    assert_same(run(model, inputs), run(fresh(tiny_llama, second), inputs), base=want_first)
    for path, unit in lora_units(model).items():  # in place: the same parameters, the scaling a float still
        assert all(x is y for x, y in zip(pair(unit), params[path])) and isinstance(unit.scaling, float)


@pytest.mark.parametrize("second", [dict(r=2, lora_alpha=4), dict(r=4, lora_alpha=6)], ids=["rank", "alpha"])
def test_other_rank_or_alpha_without_prepare_is_refused(second: dict, tmp_path) -> None:
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=4, lora_alpha=8, target_modules=LLAMA_QV)
    other = write_adapter(tmp_path / "other", tiny_llama, 2, target_modules=LLAMA_QV, **second)
    model = fresh(tiny_llama, first)
    before, out = snapshot(model), run(model, model_inputs("llama"))
    with pytest.raises(peftkit.ModelError, match=r"not prepared.*prepare_hotswap\(model, max_rank\)"):
        peftkit.hotswap(model, other, "default")
    assert_unchanged(model, before)
    assert torch.equal(run(model, model_inputs("llama")), out)


# -- refusals: each names what is wrong and changes nothing -----------------------------------


@pytest.fixture
def prepared(tmp_path):
    """A llama with adapter 'default' (r 4, q/v) prepared to rank 8, and another file of the same
    shape with other values (the files refused are edited copies of it: a swap that copied
    before checking everything would change the model)."""
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=4, lora_alpha=7, target_modules=LLAMA_QV)
    other = write_adapter(tmp_path / "same-shape", tiny_llama, 2, r=4, lora_alpha=7, target_modules=LLAMA_QV)
    model = fresh(tiny_llama, first)
    peftkit.prepare_hotswap(model, 8)
    return model, other


def edited(src: str, dst, config: dict | None = None, drop: str | None = None) -> str:
    """A copy of adapter ``src`` with config fields replaced and/or tensor keys containing ``drop`` removed."""
    os.makedirs(dst)
    with open(os.path.join(src, CONFIG)) as f:
        data = json.load(f)
    data.update(config or {})
    with open(os.path.join(dst, CONFIG), "w") as f:
        json.dump(data, f)
    tensors = load_file(os.path.join(src, WEIGHTS))
    if drop is not None:
        tensors = {k: v for k, v in tensors.items() if drop not in k}
    save_file(tensors, os.path.join(dst, WEIGHTS))
    return os.fspath(dst)


REFUSED_FILES = {
    "use_rslora": (lambda d, f: edited(f, d, {"use_rslora": True}), peftkit.AdapterFileError,
                   r"use_rslora: the loaded adapter 'default' has False, the file has True"),
    "lora_dropout": (lambda d, f: edited(f, d, {"lora_dropout": 0.1}), peftkit.AdapterFileError,
                     r"lora_dropout: the loaded adapter 'default' has 0.0, the file has 0.1"),
    "alpha_pattern": (lambda d, f: edited(f, d, {"alpha_pattern": {"q_proj": 3}}), peftkit.AdapterFileError,
                      r"alpha_pattern: the loaded adapter 'default' has \{\}, the file has \{'q_proj': 3\}"),
    "bias": (lambda d, f: edited(f, d, {"bias": "lora_only"}), peftkit.AdapterFileError,
             r"bias: the loaded adapter 'default' has 'none', the file has 'lora_only'"),
    "use_dora": (lambda d, f: write_adapter(d, tiny_llama, 2, r=4, lora_alpha=7, target_modules=LLAMA_QV,
                                            use_dora=True), peftkit.AdapterFileError,
                 r"use_dora: the loaded adapter 'default' has False, the file has True"),
    "peft_type": (lambda d, f: _loha_file(d), peftkit.AdapterFileError,
                  r"peft_type: the loaded adapter 'default' is 'LORA', the file is 'LOHA'"),
    "new module": (lambda d, f: write_adapter(d, tiny_llama, 2, r=4, lora_alpha=7,
                                              target_modules=["q_proj", "v_proj", "k_proj"]),
                   peftkit.AdapterFileError, r"adapts module 'model\.layers\.0\.self_attn\.k_proj' \(and 1 more\), "
                                             r"which adapter 'default' does not"),
    "rank above the padding": (lambda d, f: write_adapter(d, tiny_llama, 2, r=12, lora_alpha=7,
                                                          target_modules=LLAMA_QV),
                               peftkit.ModelError, r"rank 12 .* padded to; call peftkit\.prepare_hotswap\(model, "
                                                   r"max_rank=12\)"),
    # the last module's rank only (rank_pattern): the others would be copied already by a swap copying as it goes
    "rank the config does not give": (lambda d, f: edited(f, d, {"rank_pattern": {"layers.1.self_attn.v_proj": 6}}),
                                      peftkit.AdapterFileError,
                                      r"key base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_A\.weight "
                                      r"has shape \(4, 32\) in the file but \(6, 32\)"),
    # the last module's B only
    "half a module": (lambda d, f: edited(f, d, drop="layers.1.self_attn.v_proj.lora_B"), peftkit.AdapterFileError,
                      r"missing key base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight"),
    "no directory": (lambda d, f: os.fspath(d), peftkit.AdapterFileError, r"adapter directory not found"),
}


def _loha_file(directory) -> str:
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoHaConfig(r=4, target_modules=LLAMA_QV))
    peftkit.save(model, directory)
    return os.fspath(directory)


@pytest.mark.parametrize("what", list(REFUSED_FILES))
def test_refused_file_changes_nothing(what: str, prepared, tmp_path) -> None:
    model, same_shape = prepared
    make, error, message = REFUSED_FILES[what]
    other = make(tmp_path / "other", same_shape)
    inputs = model_inputs("llama")
    before, out = snapshot(model), run(model, inputs)
    with pytest.raises(error, match=message):
        peftkit.hotswap(model, other, "default")
    assert_unchanged(model, before)
    assert torch.equal(run(model, inputs), out)


def test_refused_adapter_names_and_states(prepared, tmp_path) -> None:
    model, _ = prepared
    second = write_adapter(tmp_path / "second", tiny_llama, 2, r=6, lora_alpha=3, target_modules=LLAMA_QV)
    before = snapshot(model)
    with pytest.raises(peftkit.ModelError, match=r"no adapter named 'other' \(adapters: 'default'\)"):
        peftkit.hotswap(model, second, "other")
    assert_unchanged(model, before)
    peftkit.merge(model, probe=model_inputs("llama"))
    merged = snapshot(model)
    with pytest.raises(peftkit.ModelError, match=r"adapter 'default' is merged .*peftkit\.unmerge\(model\) first"):
        peftkit.hotswap(model, second, "default")
    assert_unchanged(model, merged)
    with pytest.raises(peftkit.ModelError, match=r"LlamaForCausalLM has no peftkit adapters"):
        peftkit.hotswap(tiny_llama(), second, "default")


def test_hotswap_of_a_non_lora_adapter_is_refused(tmp_path) -> None:
    second = write_adapter(tmp_path / "second", tiny_llama, 2, r=4, lora_alpha=7, target_modules=LLAMA_QV)
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoHaConfig(r=4, target_modules=LLAMA_QV), "loha")
    with pytest.raises(peftkit.ConfigError, match=r"adapter 'loha' is LOHA; hot-swapping supports LoRA adapters only"):
        peftkit.hotswap(model, second, "loha")


def test_prepare_hotswap_refusals(tmp_path) -> None:
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=4, lora_alpha=7, target_modules=LLAMA_QV,
                          rank_pattern={"model.layers.1.self_attn.v_proj": 6})
    with pytest.raises(peftkit.ModelError, match=r"LlamaForCausalLM has no peftkit adapters"):
        peftkit.prepare_hotswap(tiny_llama(), 8)

    model = fresh(tiny_llama, first)
    for bad in (0, -2, True, "8", 4.0):
        with pytest.raises(peftkit.ConfigError, match=r"prepare_hotswap: max_rank: expected a positive integer"):
            peftkit.prepare_hotswap(model, bad)
    before = snapshot(model)
    with pytest.raises(peftkit.ConfigError, match=r"max_rank 5 is below the rank 6 of adapter 'default' \(module "
                                                   r"'model\.layers\.1\.self_attn\.v_proj'\); pass max_rank >= 6"):
        peftkit.prepare_hotswap(model, 5)
    assert_unchanged(model, before)

    peftkit.apply(model, peftkit.LoHaConfig(r=2, target_modules=["k_proj"]), "loha")
    with pytest.raises(peftkit.ModelError, match=r"LoRA adapters only, and the model has 'loha' \(LOHA\); delete it"):
        peftkit.prepare_hotswap(model, 8)
    peftkit.delete(model, "loha")
    assert_unchanged(model, before)

    peftkit.set_active(model, "default")
    peftkit.merge(model, probe=model_inputs("llama"))
    with pytest.raises(peftkit.ModelError, match=r"adapter 'default' is merged .*unmerge"):
        peftkit.prepare_hotswap(model, 8)
    peftkit.unmerge(model)

    compiled = torch.compile(model, backend="eager")
    with pytest.raises(peftkit.ModelError, match=r"compiled already .*before compiling"):
        peftkit.prepare_hotswap(compiled, 8)
    assert all(isinstance(u.scaling, float) for u in lora_units(model).values())


# -- torch.compile ----------------------------------------------------------------------------


def _graphs() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["frames"]["ok"]


COMPILED = {
    "llama-lora": (tiny_llama, lambda: model_inputs("llama"), dict(target_modules=LLAMA_QV), ["q_proj"]),
    "llama-dora": (tiny_llama, lambda: model_inputs("llama"), dict(target_modules=LLAMA_QV, use_dora=True), ["q_proj"]),
    "conv2d-embedding": (ConvNet, conv_inputs, dict(target_modules=["conv", "emb", "fc"]), ["conv"]),
}


@pytest.mark.parametrize("what", list(COMPILED))
def test_compiled_swap_does_not_recompile(what: str, tmp_path) -> None:
    build, make_inputs, common, fewer = COMPILED[what]
    first = write_adapter(tmp_path / "first", build, 1, r=4, lora_alpha=7, **common)
    second = write_adapter(tmp_path / "second", build, 2, r=8, lora_alpha=20, **common)
    subset = write_adapter(tmp_path / "subset", build, 3, r=2, lora_alpha=3, **{**common, "target_modules": fewer})
    inputs = make_inputs()
    model = fresh(build, first)
    peftkit.prepare_hotswap(model, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    try:
        with torch.no_grad():
            got_first = run(compiled, inputs)
        assert_same(got_first, run(fresh(build, first), inputs))
        compiled_once = _graphs()
        assert compiled_once[0] >= 1
        for directory in (second, subset, first):
            peftkit.hotswap(compiled, directory, "default")  # the compiled wrapper or the model: either
            with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
                got = run(compiled, inputs)
            assert_same(got, run(fresh(build, directory), inputs))
            assert _graphs() == compiled_once, directory
        assert not torch.equal(got_first, run(fresh(build, second), inputs))
    finally:
        torch._dynamo.reset()


def test_without_prepare_a_new_scaling_recompiles(tmp_path) -> None:
    """The control of the test above: the counters do see a recompilation when the scaling is a
    float (what ``prepare_hotswap`` turns into a tensor)."""
    first = write_adapter(tmp_path / "first", tiny_llama, 1, r=4, lora_alpha=7, target_modules=LLAMA_QV)
    inputs = model_inputs("llama")
    model = fresh(tiny_llama, first)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    try:
        with torch.no_grad():
            compiled(**inputs)
        once = _graphs()
        for unit in lora_units(model).values():
            unit.scaling = 3.0
        with torch.no_grad():
            compiled(**inputs)
        assert _graphs()[0] > once[0]
    finally:
        torch._dynamo.reset()

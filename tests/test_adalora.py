"""AdaLoRA (``methods/adalora.py``) beyond the conformance suite.

- Files exchanged with HF PEFT both ways with equal outputs (every trainable parameter moved):
  tiny BERT (default targets; several targets with a ``modules_to_save`` classifier; a layer
  filter; ``bias="lora_only"``), tiny Llama (all linear layers) and GPT-2 (``Conv1D``); the keys,
  shapes and config fields HF PEFT writes; a file with a reduced ``rank_pattern`` from HF PEFT's own
  allocation loads in peftkit with equal outputs (and is written back unchanged).
- The allocation against HF PEFT's: one seed gives the same initial tensors; the same model, data
  and steps give the same budgets, masks, final rank_pattern and parameters at every step (BERT,
  GPT-2); the budget schedule equals HF's RankAllocator's; the regulariser equals HF's.
- Composition with LoRA against a hand-computed output; merged equals unmerged.
- ``peftkit train --method adalora``: the final ranks add up to target_r × layers, the file loads in
  HF PEFT and peftkit with equal outputs; ``--resume`` (in the budget phase and after the final
  allocation) reaches the uninterrupted run's adapter.
- Bad configs, files and schedules are ``ConfigError``s naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit import registry
from peftkit.layer import AdapterLayer
from peftkit.methods import adalora
from peftkit.methods.adalora import AdaLoraConfig

from cli_helpers import invoke, save_tiny_bert, write_topic_files
from conftest import model_inputs, tiny_bert, tiny_gpt2, tiny_llama
from interop_helpers import assert_same, hf_from_pretrained, perturb_trainable, run

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # HF PEFT's own notes: on a layer whose allocation kept no triplet (its tensors have 0 rows, on
    # purpose here), and on reading its rank_pattern keys, which its LoRA-level matching ignores
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match"),
]
WEIGHTS = "adapter_model.safetensors"
BUILD = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
HF_TASK = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM"}


def hf_model(kind: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out set for Conv1D, ...
        return peft.get_peft_model(BUILD[kind](), peft.AdaLoraConfig(task_type=HF_TASK[kind], **kwargs))


def hf_load(kind: str, directory):
    model = hf_from_pretrained(BUILD[kind](), directory)
    return model


@dataclass
class Case:
    id: str
    kind: str
    kwargs: dict = field(default_factory=dict)


CASES = [
    Case("bert-default-targets", "bert"),
    Case("bert-modules-to-save", "bert",
         dict(target_modules=["query", "key", "value", "intermediate.dense"], modules_to_save=["classifier"],
              init_r=3, target_r=2, lora_alpha=6, lora_dropout=0.1)),
    Case("bert-layers", "bert", dict(target_modules=["query", "value", "dense"], layers_to_transform=[1],
                                     layers_pattern="layer", init_r=5)),
    Case("bert-bias-lora-only", "bert", dict(target_modules=["query", "value"], bias="lora_only")),
    Case("llama-all-linear", "llama", dict(target_modules="all-linear", init_r=4, lora_alpha=16)),
    Case("gpt2-conv1d", "gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], init_r=4)),
]
CASE_IDS = [c.id for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hf_adapter_loads_in_peftkit(case: Case, tmp_path) -> None:
    inputs = model_inputs(case.kind)
    hf = hf_model(case.kind, total_step=100, **case.kwargs)
    assert perturb_trainable(hf) > 0
    hf.eval()
    hf.save_pretrained(tmp_path)

    model = peftkit.load(BUILD[case.kind](), tmp_path)
    assert peftkit.read_config(tmp_path).peft_type == "ADALORA"
    assert_same(run(model, inputs), run(hf, inputs), run(BUILD[case.kind](), inputs))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peftkit_adapter_loads_in_hf(case: Case, tmp_path) -> None:
    inputs = model_inputs(case.kind)
    model = peftkit.apply(BUILD[case.kind](), AdaLoraConfig(total_step=100, **case.kwargs))
    assert perturb_trainable(model) > 0
    model.eval()
    peftkit.save(model, tmp_path)
    want = run(model, inputs)

    hf = hf_load(case.kind, tmp_path)
    assert hf.peft_config["default"].peft_type == peft.PeftType.ADALORA
    theirs, ours = peft.get_peft_model_state_dict(hf), load_file(tmp_path / WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key
    assert_same(run(hf, inputs), want, run(BUILD[case.kind](), inputs))
    # HF's merge of the file equals the unmerged outputs, and peftkit's merge too.
    assert_same(run(hf.merge_and_unload(), inputs), want)
    peftkit.merge(model)
    assert_same(run(model, inputs), want)


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "bert"], ids=[c.id for c in CASES if c.kind == "bert"])
def test_files_equal_what_hf_writes(case: Case, tmp_path) -> None:
    build = BUILD[case.kind]
    peftkit.save(peftkit.apply(build(), AdaLoraConfig(total_step=100, **case.kwargs)), tmp_path / "pk")
    hf_model(case.kind, total_step=100, **case.kwargs).save_pretrained(tmp_path / "hf")

    ours, theirs = load_file(tmp_path / "pk" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert (ours[key].shape, ours[key].dtype) == (theirs[key].shape, theirs[key].dtype), key
    mine = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    hfs = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    # HF's LoraConfig fields that its AdaLoRA never uses, and its bookkeeping, are not written
    unused = set(AdaLoraConfig.ignored_fields) | {"peft_version", "auto_mapping"}
    assert set(mine) == set(hfs) - unused
    for name in set(mine) - {"target_modules", "modules_to_save"}:
        assert mine[name] == hfs[name], name
    read = peft.AdaLoraConfig.from_pretrained(tmp_path / "pk")
    for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                 "total_step", "lora_alpha", "lora_dropout", "rank_pattern", "bias"):
        assert getattr(read, name) == mine[name], name


def test_tensor_keys_shapes_and_identity_at_init() -> None:
    model = peftkit.apply(tiny_gpt2(), AdaLoraConfig(init_r=5, target_modules=["c_attn", "c_fc"]))
    p = "base_model.model.transformer.h.0."
    shapes = {k: tuple(v.shape) for k, v in peftkit.io.adapter_tensors(model, "default").items() if k.startswith(p)}
    assert shapes == {p + "attn.c_attn.lora_A": (5, 32), p + "attn.c_attn.lora_E": (5, 1),
                      p + "attn.c_attn.lora_B": (96, 5), p + "mlp.c_fc.lora_A": (5, 32),
                      p + "mlp.c_fc.lora_E": (5, 1), p + "mlp.c_fc.lora_B": (128, 5)}
    inputs = model_inputs("gpt2")
    assert torch.equal(run(model, inputs), run(tiny_gpt2(), inputs))
    for _, unit in adalora.units(model):
        assert not unit.lora_E.any() and 0.01 < unit.lora_A.std() < 0.03  # HF's init: E zero, A, B N(0, 0.02²)


# -- the allocation, against HF PEFT's -----------------------------------------------------------

SCHEDULE = dict(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2)
ALLOCATION_TARGETS = {"bert": ["query", "value", "dense"], "gpt2": ["c_attn", "c_proj"]}


def _batch(kind: str) -> dict:
    inputs = model_inputs(kind, batch=4, length=8)
    inputs["labels"] = torch.tensor([0, 1, 0, 1]) if kind == "bert" else inputs["input_ids"].clone()
    return inputs


def _hf_factors(hf) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p for n, p in hf.named_parameters() if ".lora_" in n}


def _our_factors(model) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{path}.{f}": getattr(u, f) for path, u in adalora.units(model) for f in adalora.FACTORS}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_allocation_equals_hf(kind, tmp_path) -> None:
    """Same seed, data and steps: the same initial tensors, and at every step the same budget, the
    same masked triplets and the same parameters; the same final rank_pattern and file."""
    kwargs = dict(SCHEDULE, target_modules=ALLOCATION_TARGETS[kind])
    torch.manual_seed(42)
    hf = hf_model(kind, **kwargs)
    torch.manual_seed(42)
    ours = peftkit.apply(BUILD[kind](), AdaLoraConfig(**kwargs))
    theirs, mine = _hf_factors(hf), _our_factors(ours)
    assert sorted(theirs) == sorted(mine)
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)  # HF's draws, in its order

    batch = _batch(kind)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (hf, ours)]
    hf.train(), ours.train()
    masked_some = False
    for step in range(1, SCHEDULE["total_step"] + 1):
        torch.manual_seed(step)  # the same dropout masks in both
        hf(**batch).loss.backward()  # HF adds orth_reg_weight × its regulariser in forward
        optimizers[0].step()
        hf.base_model.update_and_allocate(step)
        torch.manual_seed(step)
        loss = ours(**batch).loss + adalora._loss(ours, "default")
        loss.backward()
        optimizers[1].step()
        budget, kept = adalora.update_and_allocate(ours, step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        want_budget, _ = hf.base_model.rankallocator.budget_schedule(step)
        assert budget == want_budget, step
        theirs, mine = _hf_factors(hf), _our_factors(ours)
        for key in mine:
            assert torch.equal(theirs[key], mine[key]), (step, key)
        if kept is not None:
            masked_some = masked_some or not all(all(k) for k in kept.values())
            assert sum(map(sum, kept.values())) <= budget
    assert masked_some
    config = peftkit.state.get_state(ours).configs["default"]
    assert {k + ".default": v for k, v in config.rank_pattern.items()} == hf.peft_config["default"].rank_pattern
    assert sum(map(sum, config.rank_pattern.values())) == SCHEDULE["target_r"] * len(list(adalora.units(ours)))

    hf.eval(), ours.eval()
    peftkit.save(ours, tmp_path / "pk")
    hf.save_pretrained(tmp_path / "hf")
    a, b = load_file(tmp_path / "pk" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    mine_json = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    assert mine_json["rank_pattern"] == json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["rank_pattern"]
    inputs = model_inputs(kind)
    assert_same(run(hf_load(kind, tmp_path / "pk"), inputs), run(ours, inputs), run(BUILD[kind](), inputs))
    assert_same(run(peftkit.load(BUILD[kind](), tmp_path / "pk"), inputs), run(ours, inputs))


def test_budget_schedule_equals_hf() -> None:
    from peft.tuners.adalora.layer import RankAllocator

    for schedule in (dict(tinit=0, tfinal=0, deltaT=1, total_step=30), dict(tinit=5, tfinal=7, deltaT=3, total_step=40),
                     dict(tinit=10, tfinal=0, deltaT=10, total_step=100)):
        hf = peft.get_peft_model(tiny_bert(), peft.AdaLoraConfig(init_r=7, target_r=3, **schedule))
        allocator = hf.base_model.rankallocator
        assert isinstance(allocator, RankAllocator)
        config = AdaLoraConfig(init_r=7, target_r=3, **schedule)
        for step in range(0, schedule["total_step"] + 1):
            got = adalora.budget_schedule(config, step, allocator.init_bgt, allocator.target_bgt)
            assert got == allocator.budget_schedule(step), (schedule, step)


def test_a_reduced_rank_pattern_from_hf_loads_in_peftkit(tmp_path) -> None:
    """HF PEFT's own allocation (its update_and_allocate to the final budget) writes a file with a
    rank_pattern and resized tensors: peftkit builds the same resized layers, with HF's outputs,
    and writes the same file back."""
    torch.manual_seed(0)
    hf = hf_model("bert", init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, target_modules=["query", "value"],
                  modules_to_save=["classifier"])
    batch = _batch("bert")
    optimizer = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=2e-2)
    hf.train()
    for step in range(1, 9):
        hf(**batch).loss.backward()
        optimizer.step()
        hf.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    hf.eval()
    hf.save_pretrained(tmp_path / "hf")
    pattern = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["rank_pattern"]
    ranks = {k: sum(v) for k, v in pattern.items()}
    assert sum(ranks.values()) == 2 * 4 and len(set(ranks.values())) > 1  # a budget shared unevenly

    inputs = model_inputs("bert")
    model = peftkit.load(tiny_bert(), tmp_path / "hf")
    for path, unit in adalora.units(model):
        assert unit.r == ranks[path + ".lora_E"] and unit.lora_A.shape == (unit.r, 32)
    assert_same(run(model, inputs), run(hf, inputs), run(tiny_bert(), inputs))
    assert_same(run(hf_load("bert", tmp_path / "hf"), inputs), run(hf, inputs))
    peftkit.save(model, tmp_path / "again")
    a, b = load_file(tmp_path / "again" / WEIGHTS), load_file(tmp_path / "hf" / WEIGHTS)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == pattern
    # trained further with the allocation, the pattern stays one over the init_r triplets
    peftkit.delete(model, "default")
    model = peftkit.load(tiny_bert(), tmp_path / "hf", trainable=True)
    config = peftkit.state.get_state(model).configs["default"]
    config.tinit, config.tfinal, config.total_step, config.target_r = 0, 0, 1, 1
    model.train()
    model(**batch).loss.backward()
    adalora.update_and_allocate(model, 1)
    assert all(len(v) == 4 for v in config.rank_pattern.values())
    assert sum(map(sum, config.rank_pattern.values())) == 4
    assert all(not new or old for k in pattern for new, old in zip(config.rank_pattern[k], pattern[k]))
    peftkit.save(model, tmp_path / "further")
    assert_same(run(hf_load("bert", tmp_path / "further"), inputs), run(model.eval(), inputs))


def test_regularizer_equals_hf() -> None:
    hf = hf_model("bert", init_r=5, total_step=10, target_modules=["query", "value", "intermediate.dense"])
    perturb_trainable(hf, scale=0.3)
    ours = peftkit.apply(tiny_bert(), AdaLoraConfig(init_r=5, total_step=10,
                                                   target_modules=["query", "value", "intermediate.dense"]))
    with torch.no_grad():
        theirs = _hf_factors(hf)
        for key, p in _our_factors(ours).items():
            p.copy_(theirs[key])
    batch = _batch("bert")
    config = hf.peft_config["default"]
    with torch.no_grad():
        with_reg = hf(**batch).loss
        config.orth_reg_weight = 0.0
        plain = hf(**batch).loss
    hf_reg = (with_reg - plain) / 0.5
    torch.testing.assert_close(adalora.orthogonal_regularizer(ours).detach(), hf_reg, rtol=0, atol=1e-6)
    torch.testing.assert_close(adalora._loss(ours, "default").detach(), 0.5 * hf_reg, rtol=0, atol=1e-6)
    peftkit.state.get_state(ours).configs["default"].orth_reg_weight = 0.0
    assert adalora._loss(ours, "default") is None


# -- composition -----------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def test_adalora_and_lora_compose_on_the_same_and_other_layers() -> None:
    """LoRA on fc1, AdaLoRA on fc1 and fc2, both active: each adds its own term."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    model = _mlp()
    w1, b1, w2, b2 = (t.detach().clone() for t in (model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias))
    peftkit.apply(model, peftkit.LoraConfig(r=2, lora_alpha=6, target_modules=["fc1"], init_lora_weights=False),
                  name="lo")
    peftkit.apply(model, AdaLoraConfig(init_r=3, lora_alpha=5, target_modules=["fc1", "fc2"]), name="ad")
    perturb_trainable(model)  # only "ad" is trainable now: E is no longer zero
    peftkit.set_active(model, ["lo", "ad"])
    lora, ada1, ada2 = model.fc1.adapters["lo"], model.fc1.adapters["ad"], model.fc2.adapters["ad"]
    assert ada1.lora_E.abs().min() > 0
    divisor = float(torch.tensor(3.0) + 1e-5)  # HF's ranknum + 1e-5, in float32
    with torch.no_grad():
        d_lora = 3.0 * (lora.lora_B @ lora.lora_A)
        d1 = 5.0 / divisor * (ada1.lora_B @ torch.diag(ada1.lora_E.view(-1)) @ ada1.lora_A)
        d2 = 5.0 / divisor * (ada2.lora_B @ torch.diag(ada2.lora_E.view(-1)) @ ada2.lora_A)
        want = torch.relu(x @ (w1 + d_lora + d1).T + b1) @ (w2 + d2).T + b2
        assert_same(model(x), want)
        peftkit.set_active(model, ["ad"])
        assert_same(model(x), torch.relu(x @ (w1 + d1).T + b1) @ (w2 + d2).T + b2)
        peftkit.set_active(model, ["lo", "ad"])
        peftkit.merge(model)
        assert_same(model(x), want)
        peftkit.unmerge(model)
        assert torch.allclose(model.fc1.base_layer.weight, w1, atol=1e-6)
    assert [n for n, _ in adalora.units(model, "ad")] == ["fc1", "fc2"] and not list(adalora.units(model, "lo"))


# -- the API's allocation: errors and edge cases --------------------------------------------------


def test_allocation_needs_total_step_and_a_schedule() -> None:
    model = peftkit.apply(_mlp(), AdaLoraConfig(init_r=3, target_r=1, target_modules=["fc1", "fc2"]))
    with pytest.raises(peftkit.ConfigError, match="total_step: expected the number of training steps"):
        adalora.update_and_allocate(model, 1)
    adalora._begin(model, "default", 7)  # the trainer's begin: the run's steps
    assert peftkit.state.get_state(model).configs["default"].total_step == 7
    model = peftkit.apply(_mlp(), AdaLoraConfig(init_r=3, target_r=1, tinit=5, target_modules=["fc1"]))
    with pytest.raises(peftkit.ConfigError, match=r"total_step: expected more than tinit \+ tfinal = 5 steps"):
        adalora._begin(model, "default", 4)
    with pytest.raises(peftkit.ModelError, match="no AdaLoRA adapter named 'x'"):
        adalora.update_and_allocate(model, 1, "x")


def test_no_budget_to_cut_masks_nothing() -> None:
    """target_r = init_r: nothing to mask (HF's kthvalue would fail on k = 0)."""
    model = peftkit.apply(_mlp(), AdaLoraConfig(init_r=2, target_r=2, total_step=3, target_modules=["fc1", "fc2"],
                                                init_lora_weights=False))
    x = torch.randn(4, 8)
    for step in (1, 2, 3):
        model(x).sum().backward()
        adalora.update_and_allocate(model, step)
        model.zero_grad()
    assert all(unit.lora_E.all() for _, unit in adalora.units(model))
    assert all(all(v) for v in peftkit.state.get_state(model).configs["default"].rank_pattern.values())


def test_begin_starts_a_new_allocation() -> None:
    model = peftkit.apply(_mlp(), AdaLoraConfig(init_r=3, target_r=1, total_step=2, target_modules=["fc1", "fc2"],
                                                init_lora_weights=False))
    x = torch.randn(4, 8)
    for step in (1, 2):
        model(x).sum().backward()
        adalora.update_and_allocate(model, step)
        model.zero_grad()
    config = peftkit.state.get_state(model).configs["default"]
    assert sum(map(sum, config.rank_pattern.values())) == 2
    assert peftkit.io.adapter_tensors(model, "default")["base_model.model.fc1.lora_E"].shape[0] <= 2
    adalora._begin(model, "default", 2)
    assert config.rank_pattern is None and all(u.keep is None for _, u in adalora.units(model))
    assert peftkit.io.adapter_tensors(model, "default")["base_model.model.fc1.lora_E"].shape == (3, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_allocation_on_cuda_with_bf16_autocast(tmp_path) -> None:
    model = peftkit.apply(tiny_bert().cuda(), AdaLoraConfig(init_r=4, target_r=2, total_step=4))
    batch = {k: v.cuda() for k, v in _batch("bert").items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(1, 5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss + adalora._loss(model, "default")
        loss.backward()
        optimizer.step()
        adalora.update_and_allocate(model, step)
        optimizer.zero_grad()
    model.eval()
    peftkit.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sum(map(sum, config["rank_pattern"].values())) == 2 * 4
    inputs = model_inputs("bert")
    want = run(model, {k: v.cuda() for k, v in inputs.items()}).cpu()
    assert_same(run(peftkit.load(tiny_bert(), tmp_path), inputs), want, atol=1e-4)


# -- the trainer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    work = tmp_path_factory.mktemp("adalora-cli")
    return work, save_tiny_bert(work / "tiny-bert"), write_topic_files(work)


def _cli_inputs(tiny_model: str) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return dict(tokenizer(["the cat plays piano", "interest on savings"], padding=True, return_tensors="pt"))


def _cli_base(tiny_model: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3,
                                                              ignore_mismatched_sizes=True).eval()


def test_cli_train_ends_with_the_scheduled_ranks_and_hf_loads_it(cli_files) -> None:
    work, tiny_model, (train, _) = cli_files
    out = work / "run"
    result = invoke("train", "--method", "adalora", "--model", tiny_model, "--data", train, "--max-steps", 6,
                    "--batch-size", 4, "--r", 2, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["task_type"] == "SEQ_CLS"
    # --r is the target rank, init_r 1.5 times it; total_step is the run's number of steps
    assert (config["target_r"], config["init_r"], config["total_step"], config["lora_alpha"]) == (2, 3, 6, 16.0)
    layers = config["target_modules"]
    assert len(layers) == 4 and all(len(v) == 3 for v in config["rank_pattern"].values())
    assert sorted(k[: -len(".lora_E")] for k in config["rank_pattern"]) == sorted(layers)
    assert sum(map(sum, config["rank_pattern"].values())) == 2 * len(layers)  # the final budget
    tensors = load_file(adapter / WEIGHTS)
    for key, mask in config["rank_pattern"].items():
        e = tensors[f"base_model.model.{key}"]
        assert e.shape == (sum(mask), 1) and (e.numel() == 0 or e.abs().min() > 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "adalora"
    assert summary["options"]["lr"] == registry.get("ADALORA").cli[0].defaults["lr"]

    inputs = _cli_inputs(tiny_model)
    ours = peftkit.load(_cli_base(tiny_model), adapter)
    theirs = peft.PeftModel.from_pretrained(_cli_base(tiny_model), adapter).eval()
    assert theirs.peft_config["default"].peft_type == peft.PeftType.ADALORA
    assert_same(run(theirs, inputs), run(ours, inputs), run(_cli_base(tiny_model), inputs))


def _with_schedule(monkeypatch, **schedule) -> None:
    """``--method adalora`` with another schedule (the CLI has no options for it)."""
    from peftkit.train import engine

    method, entry = engine.CLI_METHODS["adalora"]

    def make(values):
        return dataclasses.replace(entry.make_config(values), **schedule)

    monkeypatch.setitem(engine.CLI_METHODS, "adalora", (method, dataclasses.replace(entry, make_config=make)))


def _same_adapter(a, b) -> None:
    ta, tb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()


def test_resume_equals_uninterrupted(cli_files, monkeypatch) -> None:
    """Checkpoints at steps 2 (warm-up over, budget phase) and 4 (the final allocation, tinit=1,
    tfinal=2 of 6 steps): resuming from either reaches the uninterrupted run's adapter."""
    work, tiny_model, (train, evaluation) = cli_files
    _with_schedule(monkeypatch, tinit=1, tfinal=2)
    args = ("train", "--method", "adalora", "--model", tiny_model, "--data", train, "--eval-data", evaluation,
            "--max-steps", 6, "--batch-size", 4, "--r", 2, "--save-steps", 2, "-q")
    whole = work / "whole"
    result = invoke(*args, "--out", whole)
    assert result.exit_code == 0, result.output
    config = json.loads((whole / "adapter" / "adapter_config.json").read_text())
    assert (config["tinit"], config["tfinal"]) == (1, 2) and sum(map(sum, config["rank_pattern"].values())) == 8
    step_2 = json.loads((whole / "checkpoints" / "step-2" / "adapter" / "adapter_config.json").read_text())
    assert step_2["rank_pattern"] is None  # before the final allocation: every triplet, as the model has them
    for resume_from in (2, 4):
        resumed = work / f"resumed-{resume_from}"
        shutil.copytree(whole, resumed)
        shutil.rmtree(resumed / "adapter")
        for ckpt in (resumed / "checkpoints").iterdir():
            if int(ckpt.name.split("-")[1]) > resume_from:
                shutil.rmtree(ckpt)
        result = invoke("train", "--resume", resumed, "-q")
        assert result.exit_code == 0, result.output
        _same_adapter(resumed / "adapter", whole / "adapter")


# -- bad configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(target_r=0), "target_r: expected a positive integer, found 0"),
    (dict(init_r=2.5), "init_r: expected a positive integer, found 2.5"),
    (dict(init_r=True), "init_r: expected a positive integer"),
    (dict(tinit=-1), "tinit: expected a non-negative integer, found -1"),
    (dict(tfinal="2"), "tfinal: expected a non-negative integer, found '2'"),
    (dict(deltaT=0), "deltaT: expected a positive integer, found 0"),
    (dict(beta1=1.0), "beta1: expected a number in (0, 1), found 1.0"),
    (dict(beta2=0), "beta2: expected a number in (0, 1), found 0"),
    (dict(beta1="x"), "beta1: expected a number, found 'x'"),
    (dict(orth_reg_weight=-0.1), "orth_reg_weight: expected a number in [0.0, None), found -0.1"),
    (dict(total_step=0), "total_step: expected a positive integer, found 0"),
    (dict(total_step=10, tinit=5, tfinal=5), "total_step: expected more than tinit + tfinal = 10 steps"),
    (dict(lora_alpha="8"), "lora_alpha: expected a number, found '8'"),
    (dict(lora_dropout=1.0), "lora_dropout: expected a number in [0.0, 1.0), found 1.0"),
    (dict(bias="some"), "bias: expected 'none', 'all' or 'lora_only', found 'some'"),
    (dict(init_lora_weights="gaussian"), "init_lora_weights: expected true or false, found 'gaussian'"),
    (dict(fan_in_fan_out=1), "fan_in_fan_out: expected true or false, found 1"),
    (dict(rank_pattern=["query"]), "rank_pattern: expected a mapping of '<module>.lora_E'"),
    (dict(rank_pattern={"query": [True]}), "rank_pattern: expected keys '<module path>.lora_E'"),
    (dict(rank_pattern={"a.lora_E": [1, 0]}), "rank_pattern['a.lora_E']: expected a non-empty list of true/false"),
    (dict(rank_pattern={"a.lora_E": []}), "rank_pattern['a.lora_E']: expected a non-empty list"),
    (dict(layers_pattern="layer"), "layers_pattern: expected layers_to_transform"),
    (dict(target_modules=3), "target_modules: expected a list of module names or a regex"),
])
def test_bad_config_values(kwargs, fragment) -> None:
    with pytest.raises(peftkit.ConfigError) as info:
        AdaLoraConfig(**kwargs)
    assert fragment in str(info.value)


def test_config_from_file() -> None:
    data = AdaLoraConfig(total_step=5).to_dict()
    assert data["peft_type"] == "ADALORA" and registry.config_from_dict(data) == AdaLoraConfig(total_step=5)
    # what HF's AdaLoRA ignores (r, use_rslora, alpha_pattern) is read and ignored
    registry.config_from_dict({**data, "r": 4, "use_rslora": True, "alpha_pattern": {"q": 3}, "peft_version": "0.21"})
    with pytest.raises(peftkit.ConfigError, match=r"field 'use_dora' = True is not supported by peftkit"):
        registry.config_from_dict({**data, "use_dora": True}, source="adapter_config.json")
    with pytest.raises(peftkit.ConfigError, match="unknown field 'rank' = 4 for ADALORA"):
        registry.config_from_dict({**data, "rank": 4})
    with pytest.raises(peftkit.ConfigError, match="adapter_config.json: deltaT: expected a positive integer"):
        registry.config_from_dict({**data, "deltaT": -1}, source="adapter_config.json")


@pytest.mark.parametrize("config, fragments", [
    (AdaLoraConfig(target_modules=["word_embeddings", "query"]), ["'bert.embeddings.word_embeddings'",
                                                                  "type Embedding", "supported: Linear, Conv1D"]),
    (AdaLoraConfig(target_modules=["query"], rank_pattern={"bert.encoder.layer.0.attention.self.key.lora_E": [True] * 12}),
     ["rank_pattern: 'bert.encoder.layer.0.attention.self.key.lora_E' names no module this adapter adapts"]),
    (AdaLoraConfig(target_modules=["query"], init_r=3,
                   rank_pattern={"bert.encoder.layer.0.attention.self.query.lora_E": [True, False]}),
     ["rank_pattern['bert.encoder.layer.0.attention.self.query.lora_E']: expected init_r = 3 entries, found 2"]),
])
def test_unsupported_layers_and_patterns_change_nothing(config, fragments) -> None:
    model = tiny_bert()
    keys = list(model.state_dict())
    with pytest.raises(peftkit.ConfigError) as info:
        peftkit.apply(model, config)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())

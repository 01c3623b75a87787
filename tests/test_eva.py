"""EVA (``init_lora_weights="eva"``): A from the principal directions of each layer's inputs, ranks
redistributed by explained variance; the file HF PEFT loads; ``peftkit train --init eva``.

The references are computed here independently: the inputs of each target layer captured with
plain forward hooks on a fresh copy of the model, centred, and decomposed with
``torch.linalg.svd``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit import PeftkitWarning
from peftkit.layer import AdapterLayer
from peftkit.state import get_state, hosts
from peftkit.train import checkpoint

from cli_helpers import assert_clean_error, invoke, save_tiny_bert, write_topic_files
from conftest import tiny_bert
from interop_helpers import assert_same, hf_from_pretrained, perturb_trainable, run

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["query", "value", "attention.output.dense"]


def batches(n: int = 4, size: int = 8, length: int = 12, seed: int = 0) -> list[dict]:
    """Token batches with right padding (the last positions of some rows masked out)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 120, (size, length), generator=g)
        mask = torch.ones_like(ids)
        for row, keep in enumerate(torch.randint(length // 2, length + 1, (size,), generator=g).tolist()):
            mask[row, keep:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def eva_bert(r: int = 4, alpha: float = 8, **eva):
    model = tiny_bert()
    peftkit.apply(model, peftkit.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="eva",
                                            eva_config=eva or None, task_type="SEQ_CLS"))
    return model


def reference_inputs(data: list[dict]) -> dict[str, torch.Tensor]:
    """Every target layer's input rows (padding left out) on ``data``, from a fresh tiny BERT."""
    model = tiny_bert()
    rows: dict[str, list[torch.Tensor]] = {}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(
        n == t or n.endswith("." + t) for t in TARGETS)]
    mask = {}

    def hook(name):
        def fn(module, args):
            rows.setdefault(name, []).append(args[0][mask["m"]].double())
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for batch in data:
            mask["m"] = batch["attention_mask"].bool()
            model(**batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


def principal(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(right-singular vectors, sign-fixed: each row's largest entry positive; explained-variance ratios)."""
    _, s, vh = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)
    top = vh.abs().argmax(dim=1)
    vh = vh * torch.sign(vh[torch.arange(vh.shape[0]), top]).unsqueeze(1)
    return vh, s ** 2 / (s ** 2).sum()


def expected_ranks(ratios: dict[str, torch.Tensor], order: list[str], r: int, rho: float) -> dict[str, int]:
    """The budget (r per layer) of the largest pooled ratios, ``round(r·rho)`` per layer at most;
    ties to the earlier layer."""
    pool = [(-float(v), order.index(n), i, n) for n in order for i, v in enumerate(ratios[n][: round(r * rho)])]
    counts = {n: 0 for n in order}
    for *_, n in sorted(pool)[: r * len(order)]:
        counts[n] += 1
    return counts


def test_a_is_the_top_right_singular_vectors_of_the_collected_inputs():
    data = batches(3)
    model = eva_bert(tau=1.0)  # never "converged": the three batches are used, then a warning
    with pytest.warns(PeftkitWarning, match="had not converged after 3 batches"):
        state = peftkit.get_eva_state_dict(model, data, max_batches=3)
    inputs = reference_inputs(data)
    assert set(state) == set(inputs)
    order = [n for n, _ in model.named_modules() if n in inputs]
    refs = {n: principal(x) for n, x in inputs.items()}
    ranks = expected_ranks({n: ratio for n, (_, ratio) in refs.items()}, order, r=4, rho=2.0)
    assert {n: a.shape[0] for n, a in state.items()} == ranks
    assert sum(ranks.values()) == 4 * len(order) and len(set(ranks.values())) > 1  # the budget, redistributed
    for name, a in state.items():
        vh, _ = refs[name]
        torch.testing.assert_close(a.double(), vh[: a.shape[0]], rtol=0, atol=1e-5)
        torch.testing.assert_close(a.double() @ a.double().t(), torch.eye(a.shape[0], dtype=torch.float64),
                                   rtol=0, atol=1e-5)


def test_initialize_eva_converges_sets_the_layout_and_keeps_the_model_unchanged():
    data = batches(4)
    model = eva_bert()
    before = run(model, data[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converges: no warning
        peftkit.initialize_eva(model, data)
    config = get_state(model).configs["default"]
    ranks = {p: h.adapters["default"].r for p, h in hosts(model) if isinstance(h, AdapterLayer)}
    assert sum(ranks.values()) == 4 * 6 and max(ranks.values()) <= 8
    assert config.rank_pattern == {p: k for p, k in ranks.items() if k != 4}
    assert config.alpha_pattern == {p: 8 * k / 4 for p, k in ranks.items() if k != 4}
    for path, host in hosts(model):
        if not isinstance(host, AdapterLayer):
            continue  # the classifier's copy
        unit = host.adapters["default"]
        assert unit.scaling == pytest.approx(2.0)  # adjust_scaling_factors: alpha·r'/r keeps alpha/r
        assert torch.count_nonzero(unit.lora_B) == 0 and unit.lora_A.requires_grad
    assert_same(run(model, data[0]), before, atol=0)  # B = 0: still the base model


def test_whiten_and_unadjusted_scaling():
    data = batches(3)
    plain = eva_bert(tau=1.0)
    whitened = eva_bert(tau=1.0, whiten=True, adjust_scaling_factors=False)
    with pytest.warns(PeftkitWarning):
        a = peftkit.get_eva_state_dict(plain, data, max_batches=3)
    with pytest.warns(PeftkitWarning):
        peftkit.initialize_eva(whitened, data, max_batches=3)
    inputs = reference_inputs(data)
    config = get_state(whitened).configs["default"]
    assert config.alpha_pattern == {}  # alpha stays: scaling 8 / r' per layer
    for path, host in hosts(whitened):
        if not isinstance(host, AdapterLayer):
            continue
        unit = host.adapters["default"]
        x = inputs[path] - inputs[path].mean(dim=0)
        s = torch.linalg.svdvals(x)[: unit.r]
        torch.testing.assert_close(unit.lora_A.detach().double(), a[path].double() / s.sqrt().unsqueeze(1),
                                   rtol=1e-5, atol=1e-7)
        assert unit.scaling == pytest.approx(8 / unit.r)


class TwoInputs(nn.Module):
    """fc1 sees inputs on a 4-dimensional subspace (variances 4:3:2:1), fc2 isotropic noise in 32
    dimensions: EVA's budget goes to fc1, fc2 gets rank 0 and leaves the adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 8)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc1(x) + self.fc2(y)


def two_input_batches(n: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=g)).Q.t()  # (4, 32), orthonormal rows
    scale = torch.tensor([4.0, 3.0, 2.0, 1.0]).sqrt()
    return [{"x": (torch.randn(256, 4, generator=g) * scale) @ basis, "y": torch.randn(256, 32, generator=g)}
            for _ in range(n)]


def test_rank_zero_layers_leave_the_adapter_and_the_file_loads_in_hf_peft(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs()
    peftkit.apply(model, peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights="eva"))
    data = two_input_batches()
    peftkit.initialize_eva(model, data)
    config = get_state(model).configs["default"]
    assert config.target_modules == ["fc1"] and config.rank_pattern == {"fc1": 4} and config.alpha_pattern == {"fc1": 8}
    assert not hasattr(model.fc2, "adapters")
    perturb_trainable(model)
    peftkit.save(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["rho"] == 2.0
    torch.manual_seed(0)
    hf = hf_from_pretrained(TwoInputs(), tmp_path)
    torch.testing.assert_close(run(hf, data[0]), run(model, data[0]), rtol=0, atol=1e-5)


def test_eva_bert_file_loads_in_hf_peft_and_peftkit_with_equal_outputs(tmp_path):
    data = batches(4)
    model = eva_bert()
    base = run(model, data[0])
    peftkit.initialize_eva(model, data)
    perturb_trainable(model)
    peftkit.save(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"] and saved["init_lora_weights"] == "eva"
    theirs = hf_from_pretrained(tiny_bert(), tmp_path)
    assert_same(run(theirs, data[0]), run(model, data[0]), base=base)
    again = peftkit.load(tiny_bert(), tmp_path)
    torch.testing.assert_close(run(again, data[0]), run(model, data[0]), rtol=0, atol=0)


def test_label_mask_leaves_out_ignored_positions():
    data = batches(2)
    for batch in data:  # token-level labels: the first three positions ignored
        labels = batch["input_ids"].clone()
        labels[:, :3] = -100
        batch["labels"] = labels
    model = eva_bert(tau=1.0)
    with pytest.warns(PeftkitWarning):
        got = peftkit.get_eva_state_dict(model, [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
                                                 for b in data], max_batches=2,
                                         token_mask_fn=lambda b: b["attention_mask"].bool() & (
                                             torch.arange(12) >= 3))
    masked = eva_bert(tau=1.0)
    with pytest.warns(PeftkitWarning):
        # forward without the labels (a BERT classifier does not take token labels); the mask reads them
        want = peftkit.get_eva_state_dict(masked, data, max_batches=2,
                                          forward_fn=lambda m, b: m(input_ids=b["input_ids"],
                                                                    attention_mask=b["attention_mask"]))
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k])


def test_eva_config_round_trip_and_errors():
    config = peftkit.LoraConfig(init_lora_weights="eva")
    assert config.eva_config == {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                                 "whiten": False, "adjust_scaling_factors": True}
    again = peftkit.LoraConfig.from_dict(config.to_dict())
    assert again.eva_config == config.eva_config and again.init_lora_weights == "eva"
    assert peftkit.LoraConfig(init_lora_weights="eva", eva_config=peftkit.EvaConfig(rho=1.0)).eva_config["rho"] == 1.0
    peft = pytest.importorskip("peft")
    from_hf = peftkit.LoraConfig(init_lora_weights="eva", eva_config=peft.EvaConfig(tau=0.9, whiten=True))
    assert from_hf.eva_config["tau"] == 0.9 and from_hf.eva_config["whiten"] is True
    with pytest.raises(peftkit.ConfigError, match="eva_config.rho"):
        peftkit.LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5})
    with pytest.raises(peftkit.ConfigError, match="unknown field 'tua'"):
        peftkit.LoraConfig(init_lora_weights="eva", eva_config={"tua": 0.5})
    model = tiny_bert()
    peftkit.apply(model, peftkit.LoraConfig(target_modules=["query"]))
    with pytest.raises(peftkit.ConfigError, match="init_lora_weights='eva'"):
        peftkit.initialize_eva(model, batches(1))
    with pytest.raises(peftkit.ConfigError, match="empty"):
        peftkit.initialize_eva(eva_bert(), [])


# -- peftkit train --init eva -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("eva-cli")
    model = save_tiny_bert(work / "tiny-bert", dropout=0.0)
    data, evaluation = write_topic_files(work)

    def train(out: Path, *flags):
        result = invoke("train", "--quiet", "--model", model, "--data", data, "--eval-data", evaluation,
                        "--batch-size", 4, "--out", out, *flags)
        assert result.exit_code == 0, result.output
        return out

    return work, train


def test_train_init_eva_writes_a_redistributed_adapter_and_resumes_exactly(cli_run):
    work, train = cli_run
    whole = train(work / "eva", "--init", "eva", "--targets", "query,value,attention.output.dense,intermediate.dense,"
                  "output.dense", "--r", 2, "--max-steps", 6, "--save-steps", 3, "--eval-steps", 3)
    config = json.loads((whole / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["eva_config"]["tau"] == 0.99
    tensors = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    ranks = {k: t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    assert sum(ranks.values()) == 2 * 10 and config["rank_pattern"]  # 10 layers, budget 20, redistributed
    assert config["alpha_pattern"] == {k: 16 * v / 2 for k, v in config["rank_pattern"].items()}
    resumed = work / "eva-resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / checkpoint.DIR / "step-6")
    shutil.rmtree(resumed / "adapter")
    result = invoke("train", "--resume", resumed, "--quiet")
    assert result.exit_code == 0, result.output
    again = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert set(again) == set(tensors)
    for k in tensors:
        assert torch.allclose(again[k], tensors[k], atol=1e-6, rtol=0), k


def test_train_init_eva_with_lora_fa_keeps_eva_a(cli_run):
    work, train = cli_run
    out = train(work / "eva-fa", "--init", "eva", "--lora-fa", "--max-steps", 3, "--lr", 1e-2)
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    a = {k: t for k, t in final.items() if k.endswith("lora_A.weight")}
    for k, t in a.items():  # EVA's A: orthonormal rows, untouched by training
        torch.testing.assert_close(t @ t.t(), torch.eye(t.shape[0]), rtol=0, atol=1e-5)


def test_train_init_eva_refused_for_other_methods(cli_run, tmp_path):
    work, _ = cli_run
    result = invoke("train", "--quiet", "--method", "ia3", "--init", "eva", "--out", tmp_path / "x",
                    "--model", work / "tiny-bert")
    assert_clean_error(result, "--init does not apply to --method ia3")


def test_eva_on_gpt2_conv1d_with_token_labels_loads_in_hf_peft(tmp_path):
    """GPT-2's Conv1D layers (weight (in, out)); causal-LM labels with -100 on the prompt positions."""
    from conftest import tiny_gpt2

    data = batches(4)
    for batch in data:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batch["labels"][:, :2] = -100
    model = tiny_gpt2()
    peftkit.apply(model, peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                            init_lora_weights="eva"))
    peftkit.initialize_eva(model, data)
    ranks = [h.adapters["default"].r for _, h in hosts(model) if isinstance(h, AdapterLayer)]
    assert sum(ranks) == 2 * 6
    perturb_trainable(model)
    peftkit.save(model, tmp_path)
    inputs = {"input_ids": data[0]["input_ids"], "attention_mask": data[0]["attention_mask"]}
    theirs = hf_from_pretrained(tiny_gpt2(), tmp_path)
    assert_same(run(theirs, inputs), run(model, inputs), base=run(tiny_gpt2(), inputs))


def test_layers_that_shared_an_input_once_are_told_apart_later():
    """fc1 and fc2 get equal inputs in the first batch only: from the second on, fc2 has statistics
    of its own (starting at the batch where the inputs first differ)."""
    torch.manual_seed(0)
    model = TwoInputs()
    peftkit.apply(model, peftkit.LoraConfig(r=2, lora_alpha=2, target_modules=["fc1", "fc2"], init_lora_weights="eva",
                                            eva_config={"tau": 1.0}))
    data = two_input_batches(3)
    other = two_input_batches(3, seed=1)  # inputs on another 4-dimensional subspace
    data = [{"x": data[0]["x"], "y": data[0]["x"].clone()}] + [{"x": a["x"], "y": b["x"]} for a, b in
                                                                 zip(data[1:], other[1:])]
    with pytest.warns(PeftkitWarning):
        got = peftkit.get_eva_state_dict(model, data, max_batches=3)
    assert got["fc1"].shape[0] > 0 and got["fc2"].shape[0] > 0
    for name, rows in (("fc1", torch.cat([b["x"] for b in data])), ("fc2", torch.cat([b["y"] for b in data[1:]]))):
        vh, _ = principal(rows.double())
        torch.testing.assert_close(got[name].double(), vh[: got[name].shape[0]], rtol=0, atol=1e-5)

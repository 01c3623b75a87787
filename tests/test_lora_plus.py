"""LoRA+ (B at ratio × lr) and LoRA-FA (A frozen, B's gradient projected): the optimizer
helpers against their definitions and HF PEFT's, and ``peftkit train --loraplus-lr-ratio`` /
``--lora-fa`` end to end on a tiny BERT (training, resume, option errors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit import optim
from peftkit.train import checkpoint

from cli_helpers import assert_clean_error, invoke, save_tiny_bert, write_topic_files
from conftest import tiny_bert

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (conftest.one_thread)."""


def _bert_with_lora(dora: bool = False):
    model = tiny_bert()
    targets = ["query", "value"] + ([] if dora else ["word_embeddings"])  # DoRA: no embeddings
    peftkit.apply(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                            modules_to_save=["classifier", "LayerNorm"], use_dora=dora,
                                            task_type="SEQ_CLS"))
    return model


def _by_key(model, optimizer) -> dict[str, tuple[float, float]]:
    """file key -> (lr, weight decay) of every parameter the optimizer holds."""
    key_of = {id(t): k for k, t in peftkit.io.adapter_tensors(model, "default").items()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            out[key_of[id(p)]] = (group["lr"], group["weight_decay"])
    return out


# -- LoRA+ ---------------------------------------------------------------------------------


def test_lora_plus_param_groups_give_b_ratio_times_lr_and_decay_matrices_only():
    model = _bert_with_lora()
    rates = _by_key(model, torch.optim.AdamW(peftkit.lora_plus_param_groups(model, lr=1e-3, ratio=16,
                                                                             weight_decay=0.1)))
    trainable = {k for k, t in peftkit.io.adapter_tensors(model, "default").items() if t.requires_grad}
    assert set(rates) == trainable
    for key, (lr, wd) in rates.items():
        tensor = peftkit.io.adapter_tensors(model, "default")[key]
        if key.endswith(("lora_B.weight", "lora_embedding_B")):
            assert lr == pytest.approx(16e-3), key
        else:  # A, the head's and LayerNorms' copies
            assert lr == 1e-3, key
        assert wd == (0.1 if tensor.ndim >= 2 else 0.0), key
    assert any(k.endswith("lora_embedding_B") for k in rates)
    # lr_embedding: both matrices of LoRA on an embedding at that rate (HF's loraplus_lr_embedding)
    rates = _by_key(model, torch.optim.AdamW(peftkit.lora_plus_param_groups(model, 1e-3, 16, lr_embedding=1e-6)))
    assert {v for k, v in rates.items() if "lora_embedding" in k} == {(1e-6, 0.0)}
    # ratio 1: the trainer's two plain groups
    assert len(peftkit.lora_plus_param_groups(model, 1e-3, 1.0, 0.1)) == 2
    with pytest.raises(peftkit.ConfigError, match="positive"):
        peftkit.lora_plus_param_groups(model, 1e-3, 0)


@pytest.mark.parametrize("dora", [False, True])
def test_create_loraplus_optimizer_groups_equal_hf_peft(tmp_path, dora):
    from peft.optimizers import create_loraplus_optimizer

    model = _bert_with_lora(dora)
    ours = peftkit.create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=8,
                                             loraplus_weight_decay=0.05, loraplus_lr_embedding=3e-6)
    peftkit.save(model, tmp_path)
    hf = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    theirs = create_loraplus_optimizer(hf, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=8,
                                       loraplus_weight_decay=0.05, loraplus_lr_embedding=3e-6)

    def hf_key(name: str) -> str:
        name = name.replace(".modules_to_save.default", "").replace(".default", "")
        return name[: -len(".weight")] if name.endswith("lora_magnitude_vector.weight") else name

    names = {id(p): hf_key(n) for n, p in hf.named_parameters()}
    hf_rates = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in theirs.param_groups for p in g["params"]}
    assert _by_key(model, ours) == hf_rates
    assert {lr for lr, _ in hf_rates.values()} == ({2e-4, 2e-4 * 8} if dora else {2e-4, 3e-6, 2e-4 * 8})


# -- LoRA-FA --------------------------------------------------------------------------------


def test_lora_fa_projection_is_the_least_squares_gradient_and_adamw_steps_on_it():
    """One LoRA layer: with A frozen, the step's B gradient g·(AAᵀ)⁻¹/s² is the g̃ minimising
    ‖s·g̃·A − G‖ (G: the gradient of the dense weight), and the update is AdamW's on it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    peftkit.apply(model, peftkit.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    unit = model[0].adapters["default"]
    opt = peftkit.create_lorafa_optimizer(model, r=3, lora_alpha=6, lr=1e-2)
    assert not unit.lora_A.requires_grad and unit.lora_B.requires_grad
    a0, b0 = unit.lora_A.detach().clone(), unit.lora_B.detach().clone()
    x, y = torch.randn(7, 6), torch.randn(7, 5)
    nn.functional.mse_loss(model(x), y).backward()
    # the dense weight's gradient at the same point
    w = (model[0].base_layer.weight + unit.scaling * b0 @ a0).detach().double().requires_grad_(True)
    nn.functional.mse_loss(x.double() @ w.t() + model[0].base_layer.bias.double(), y.double()).backward()
    gram = a0.double() @ a0.double().t()
    projected = unit.lora_B.grad.double() @ torch.linalg.inv(gram) / unit.scaling ** 2
    best = torch.linalg.lstsq((unit.scaling * a0.double()).t(), w.grad.t()).solution.t()  # argmin ‖s·g̃·A − G‖
    torch.testing.assert_close(projected, best, rtol=1e-5, atol=1e-8)
    ref = nn.Parameter(b0.clone())
    ref.grad = projected.float()
    reference = torch.optim.AdamW([ref], lr=1e-2, eps=1e-6, weight_decay=0.0)
    opt.step()
    reference.step()
    torch.testing.assert_close(unit.lora_B.detach(), ref.detach(), rtol=1e-5, atol=1e-7)
    assert torch.equal(unit.lora_A.detach(), a0)


def test_lora_fa_optimizer_refuses_a_trainable_a():
    model = nn.Sequential(nn.Linear(4, 4))
    peftkit.apply(model, peftkit.LoraConfig(r=2, target_modules=["0"]))
    unit = model[0].adapters["default"]
    with pytest.raises(peftkit.ConfigError, match="freeze it first"):
        peftkit.LoraFAAdamW([unit.lora_B], projections=[(unit.lora_B, unit.lora_A, 1.0)])
    assert peftkit.freeze_lora_a(model) == [unit.lora_A] and not unit.lora_A.requires_grad


# -- the trainer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora-plus")


@pytest.fixture(scope="module")
def train(workdir):
    model = save_tiny_bert(workdir / "tiny-bert", dropout=0.0)  # no dropout: runs agree step for step
    data, evaluation = write_topic_files(workdir)

    def run(out: Path, *flags, expect_ok: bool = True):
        result = invoke("train", "--quiet", "--model", model, "--data", data, "--eval-data", evaluation,
                        "--batch-size", 4, "--lr", 5e-3, "--out", out, *flags)
        if expect_ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def norms(adapter_dir: Path, kind: str) -> float:
    return sum(t.norm().item() for k, t in tensors(adapter_dir).items() if f"lora_{kind}" in k)


RUN = ("--max-steps", 6, "--save-steps", 3, "--eval-steps", 3)


@pytest.fixture(scope="module")
def plain(workdir, train) -> Path:
    train(workdir / "plain", *RUN)
    return workdir / "plain"


@pytest.fixture(scope="module")
def plus(workdir, train) -> Path:
    train(workdir / "plus", *RUN, "--loraplus-lr-ratio", 16)
    return workdir / "plus"


def test_train_loraplus_moves_b_faster(plain, plus):
    """B starts at zero; at 16× the rate it travels much further (about 15× here)."""
    assert norms(plus / "adapter", "B") > 4 * norms(plain / "adapter", "B") > 0
    options = json.loads((plus / "options.json").read_text())
    assert options["loraplus_lr_ratio"] == 16.0
    _, trainer = checkpoint.read_state(plus / checkpoint.DIR / "step-6")
    groups = trainer["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [5e-3, 5e-3, 16 * 5e-3]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01]
    assert all(p.endswith("lora_B") for p in groups[2]["params"])
    assert not any("lora_B" in p for g in groups[:2] for p in g["params"])


def crash_copy(src: Path, dst: Path, keep_until: int) -> Path:
    """``src`` as if it had died right after its checkpoint at ``keep_until``."""
    shutil.copytree(src, dst)
    for ckpt in (dst / checkpoint.DIR).iterdir():
        if int(ckpt.name.split("-")[1]) > keep_until:
            shutil.rmtree(ckpt)
    shutil.rmtree(dst / "adapter")
    (dst / "summary.json").unlink()
    return dst


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-6, rtol=0), (k, (ta[k] - tb[k]).abs().max().item())


def test_train_loraplus_resume_reaches_the_uninterrupted_run(workdir, plus):
    resumed = crash_copy(plus, workdir / "plus-resumed", 3)
    result = invoke("train", "--resume", resumed, "--quiet")
    assert result.exit_code == 0, result.output
    assert_same_adapter(resumed / "adapter", plus / "adapter")
    metrics = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [json.loads(x) for x in (plus / "metrics.jsonl").read_text().splitlines()]


def test_train_loraplus_resume_with_a_new_lr_keeps_the_ratio(workdir, plus):
    resumed = crash_copy(plus, workdir / "plus-new-lr", 3)
    result = invoke("train", "--resume", resumed, "--quiet", "--lr", 1e-3)
    assert result.exit_code == 0, result.output
    _, trainer = checkpoint.read_state(resumed / checkpoint.DIR / "step-6")
    assert [g["initial_lr"] for g in trainer["optimizer"]["param_groups"]] == [1e-3, 1e-3, 16 * 1e-3]


def test_train_lora_fa_keeps_a_and_trains_b(workdir, train, plain, monkeypatch):
    initial = {}
    freeze = optim.freeze_lora_a

    def spy(model, names=None):
        initial.update({k: t.detach().clone() for k, t in peftkit.io.adapter_tensors(model, "default").items()})
        return freeze(model, names)

    monkeypatch.setattr(optim, "freeze_lora_a", spy)
    out = workdir / "fa"
    train(out, *RUN, "--lora-fa")
    final = tensors(out / "adapter")
    a_keys = [k for k in final if "lora_A" in k]
    b_keys = [k for k in final if "lora_B" in k]
    assert a_keys and b_keys
    for k in a_keys:
        assert torch.equal(final[k], initial[k]), k
    for k in b_keys:
        assert not torch.equal(final[k], initial[k]) and final[k].abs().max() > 1e-4, k
    # A is the same draw as in a plain run (same seed), which trains it
    plain_final = tensors(plain / "adapter")
    assert all(not torch.equal(plain_final[k], initial[k]) for k in a_keys)
    monkeypatch.undo()
    _, trainer = checkpoint.read_state(out / checkpoint.DIR / "step-3")
    assert not any("lora_A" in k for k in trainer["model"])  # frozen: not in the trainer state
    resumed = crash_copy(out, workdir / "fa-resumed", 3)
    result = invoke("train", "--resume", resumed, "--quiet")
    assert result.exit_code == 0, result.output
    assert_same_adapter(resumed / "adapter", out / "adapter")


def test_train_variant_option_errors(workdir, train, tmp_path):
    result = train(tmp_path / "x", "--method", "ia3", "--loraplus-lr-ratio", 16, expect_ok=False)
    assert_clean_error(result, "--loraplus-lr-ratio does not apply to --method ia3", "lora, dora, qlora")
    result = train(tmp_path / "x", "--method", "vera", "--lora-fa", expect_ok=False)
    assert_clean_error(result, "--lora-fa does not apply to --method vera")
    result = train(tmp_path / "x", "--loraplus-lr-ratio", 0, expect_ok=False)
    assert_clean_error(result, "--loraplus-lr-ratio: expected a positive number")
    result = train(tmp_path / "x", "--lora-fa", "--loraplus-lr-ratio", 4, expect_ok=False)
    assert_clean_error(result, "--lora-fa", "--loraplus-lr-ratio", "drop one of them")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: lokr\nloraplus-lr-ratio: 16\n")
    result = train(tmp_path / "x", "--config", cfg, expect_ok=False)
    assert_clean_error(result, f"{cfg}: key 'loraplus-lr-ratio' (--loraplus-lr-ratio) does not apply to --method lokr")
    result = invoke("train", "--resume", workdir / "plus", "--loraplus-lr-ratio", 4)
    assert result.exit_code != 0 and "drop --loraplus-lr-ratio" in result.output

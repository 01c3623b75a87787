"""The method descriptor's hooks for methods that do not fit a per-layer unit factory:
a whole-adapter build step (with rollback) and the training hooks the engine calls."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit import registry
from peftkit.config import TargetedConfig
from peftkit.layer import NamedAdapters
from peftkit.methods.lora import LoraLinear
from peftkit.registry import Method, TrainingHooks

from cli_helpers import invoke, save_tiny_bert, write_topic_files


@dataclass
class SharedConfig(TargetedConfig):
    peft_type: ClassVar[str] = "SHARED_TEST"
    fail_at: int | None = None  # refuse the target with this index


class SharedHost(NamedAdapters):
    """A host the model never had (restore: delete it), holding one shared tensor per adapter."""

    def _refresh(self) -> None:
        pass

    def file_tensors(self, name, path):
        return {}

    def restore(self, merge):
        return None


def build_units(model, config, name, targets):
    shared = model._modules.get("peftkit_shared") or SharedHost()
    shared.add(name, nn.Linear(2, 2))
    model.add_module("peftkit_shared", shared)
    units = []
    for i, (path, module) in enumerate(targets):
        if i == config.fail_at:
            raise peftkit.ConfigError(f"{path}: refused for the test")
        units.append(LoraLinear(module.in_features, module.out_features, False, 2, 2.0, 0.0, False, False,
                                {"dtype": torch.float32, "device": "cpu"}))
    return units


@pytest.fixture
def shared_method(monkeypatch):
    method = Method("SHARED_TEST", SharedConfig, build_units=build_units)
    monkeypatch.setitem(registry._METHODS, "SHARED_TEST", method)
    return method


def test_a_build_step_that_fails_leaves_the_model_as_it_was(shared_method):
    from conftest import tiny_bert

    model = tiny_bert()
    keys = list(model.state_dict())
    types = [type(m) for m in model.modules()]
    with pytest.raises(peftkit.ConfigError, match="refused for the test"):
        peftkit.apply(model, SharedConfig(target_modules=["query", "value"], fail_at=2))
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == types
    assert not peftkit.state.has_adapters(model) and "peftkit_shared" not in model._modules
    peftkit.apply(model, SharedConfig(target_modules=["query", "value"]))  # the same build, succeeding
    assert isinstance(model.peftkit_shared, SharedHost) and len(peftkit.adapted_modules(model)) == 4
    peftkit.unload(model)
    assert list(model.state_dict()) == keys


def test_exactly_one_way_to_build_a_method():
    with pytest.raises(peftkit.ConfigError, match="exactly one of make_unit, build_units and attach"):
        Method("X", SharedConfig)
    with pytest.raises(peftkit.ConfigError, match="given: make_unit, build_units"):
        Method("X", SharedConfig, make_unit=lambda c, m, p: None, build_units=build_units)


# -- training hooks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    work = tmp_path_factory.mktemp("hooks")
    return work, save_tiny_bert(work / "tiny-bert"), write_topic_files(work)


def _hooked_lora(monkeypatch, calls: list, loss_scale: float = 0.0):
    from peftkit.train import engine

    lora, entry = engine.CLI_METHODS["lora"]

    def begin(model, name, total):
        calls.append(("begin", name, total))

    def loss(model, name):
        params = [p for p in model.parameters() if p.requires_grad]
        return loss_scale * sum(p.pow(2).sum() for p in params)

    def step(model, name, n):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        calls.append(("step", n, all(g is not None for g in grads)))

    def state(model, name):
        return {"seen": torch.tensor([c[1] for c in calls if c[0] == "step"])}

    def load_state(model, name, data):
        calls.append(("load_state", data["seen"].tolist()))

    hooked = dataclasses.replace(lora, training=TrainingHooks(begin, loss, step, state, load_state))
    monkeypatch.setitem(engine.CLI_METHODS, "lora", (hooked, entry))


def test_the_engine_calls_the_hooks_at_the_documented_points(monkeypatch, files, tmp_path):
    work, tiny_model, (train, evaluation) = files
    calls: list = []
    _hooked_lora(monkeypatch, calls)
    args = ("--model", tiny_model, "--data", train, "--eval-data", evaluation, "--batch-size", 4, "--grad-accum", 2,
            "--max-steps", 4, "--save-steps", 2, "-q")
    out = tmp_path / "run"
    result = invoke("train", *args, "--out", out)
    assert result.exit_code == 0, result.output
    # begin once with the run's steps; step after every optimizer step (not every micro-batch), grads present
    assert calls == [("begin", "default", 4)] + [("step", n, True) for n in (1, 2, 3, 4)]
    calls.clear()
    step_4 = out / "checkpoints" / "step-4"
    import shutil

    shutil.rmtree(step_4)  # resume from step 2: begin again, then the state the checkpoint kept
    result = invoke("train", "--resume", out, "-q")
    assert result.exit_code == 0, result.output
    assert calls == [("begin", "default", 4), ("load_state", [1, 2]), ("step", 3, True), ("step", 4, True)]


def test_the_loss_hook_adds_its_term_once_a_step(monkeypatch, files, tmp_path):
    """A large L2 term on the adapter's parameters drives them towards 0: the adapter trained
    with it is much smaller than the one trained without."""
    work, tiny_model, (train, evaluation) = files
    from safetensors.torch import load_file

    norms = {}
    for scale in (0.0, 10.0):
        _hooked_lora(monkeypatch, [], loss_scale=scale)
        out = tmp_path / f"run-{scale}"
        result = invoke("train", "--model", tiny_model, "--data", train, "--eval-data", evaluation,
                        "--batch-size", 4, "--max-steps", 6, "--lr", 1e-2, "--out", out, "-q")
        assert result.exit_code == 0, result.output
        tensors = load_file(out / "adapter" / "adapter_model.safetensors")
        norms[scale] = sum(t.norm() for k, t in tensors.items() if "lora_" in k)
    assert norms[10.0] < 0.8 * norms[0.0], norms

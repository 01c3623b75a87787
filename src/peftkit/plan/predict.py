"""The prediction: fake tensors followed through the trainer's steps (``Live``), in a fresh process."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError, ModelError
from .case import (VALIDATED_CPU, Case, _moves_in_place, build_model, enable_checkpointing, fake_batch, human,
                   infer_task, load_config, peft_config, prepare, train_options, train_steps)

# -- following the memory ------------------------------------------------------------------


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl: views and aliases share it


class Live:
    """Every storage the operations under it create, while it lives: ``peak``, and how much of what
    was alive then was gradients and optimizer state (``tag``: a storage's kind, from when it is known).

    Storages alive before (the parameters and buffers: ``known``) are never counted, also when an
    operation returns a view of one (a transposed weight)."""

    KINDS = ("grad", "opt")

    def __init__(self, known: list[torch.Tensor]) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        self.live: dict[int, tuple[int, str]] = {_key(t): (0, "") for t in known}
        self.now = self.peak = 0
        self.kind_now = dict.fromkeys(self.KINDS, 0)
        self.kind_at_peak = dict.fromkeys(self.KINDS, 0)
        self.users: dict[int, int] = {}  # tensors alive on each counted storage
        self._refs: dict[int, weakref.ref] = {}
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker.add(t)
                return out

        self.mode = Mode()

    def add(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage while ``t`` or another tensor on it lives (weak references on the
        tensors: a tensor the autograd graph holds lives on without a Python reference)."""
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            n = storage.nbytes()
            self.live[key] = (n, "")
            self.users[key] = 0
            self.now += n
            if self.now > self.peak:
                self.peak, self.kind_at_peak = self.now, dict(self.kind_now)
        if key in self.users and id(t) not in self._refs:
            self.users[key] += 1
            self._refs[id(t)] = weakref.ref(t, lambda _, k=key, i=id(t): self._drop(k, i))

    def tag(self, t: torch.Tensor, kind: str) -> None:
        self.add(t)  # a gradient the engine stored under a new tensor object
        key = _key(t)
        n, old = self.live.get(key, (0, kind))
        if old == "" and n:
            self.live[key] = (n, kind)
            self.kind_now[kind] += n

    def _drop(self, key: int, ident: int) -> None:
        self._refs.pop(ident, None)
        if key not in self.users:
            return
        self.users[key] -= 1
        if self.users[key] > 0:
            return
        del self.users[key]
        n, kind = self.live.pop(key, (0, ""))
        self.now -= n
        if kind:
            self.kind_now[kind] -= n

    def __enter__(self) -> "Live":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)
        self._refs.clear()  # no callbacks after this


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def four_bit_bytes(numel: int) -> int:
    """An NF4/FP4 weight as bitsandbytes stores it with double quantization (``peftkit.quantize``'s
    default): two values a byte, one 8-bit absmax per block of 64, one float32 per 256 of those."""
    blocks = -(-numel // 64)
    return -(-numel // 2) + blocks + 4 * -(-blocks // 256) + 4


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The layers ``peftkit.quantize`` turns into 4-bit ones (its own selection)."""
    from ..targeting import is_conv1d, logical_modules, output_head_names

    heads = output_head_names(model)
    return [m for name, m in logical_modules(model)
            if name and (isinstance(m, nn.Linear) or is_conv1d(m)) and name not in heads]


@dataclass
class Plan:
    case: Case
    task: str
    model_type: str
    weights_bytes: int
    adapter_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    peak_bytes: int
    trainable_params: int
    total_params: int
    adapter_file_bytes: int
    validated: bool
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["case"] = self.case.to_dict()
        out["method"] = self.case.method
        return out


def _checked(case: Case):
    options = train_options(case)
    config = load_config(case.model)
    task = case.task or infer_task(config)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and case.max_length > limit:
        raise ConfigError(f"--max-length {case.max_length}: the model has only {limit} positions")
    return options, config, task, peft_config(options, task)


def predict(case: Case) -> Plan:
    """The prediction for ``case`` (see the module docstring); ``predict_many`` of one."""
    return predict_many([case])[0]


def predict_many(cases: list[Case]) -> list[Plan]:
    """The predictions for ``cases``, in one fresh process (about a second each after its start).

    A model of fake tensors freed can crash the process later (torch 2.13: seen after a few
    predictions in one process), so the child keeps every fake object of every prediction
    (``_KEEP``: no data, a few MB of Python objects) and leaves without tearing down
    (``os._exit``). Bad options raise here, before the process starts."""
    import subprocess
    import sys

    from .. import errors

    for case in cases:
        _checked(case)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "peftkit.plan", json.dumps([c.to_dict() for c in cases])],
                         capture_output=True, text=True, env=env)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ModelError(f"peftkit plan: the prediction's process failed (exit status {out.returncode}): {tail}")
    plans = []
    for result in json.loads(lines[-1]):
        if "error" in result:
            raise getattr(errors, result["error"], ModelError)(result["message"])
        values = {k: result[k] for k in (f.name for f in dataclasses.fields(Plan))}
        values["case"] = Case(**result["case"])
        plans.append(Plan(**values))
    return plans


_KEEP: list[Any] = []  # every prediction's fake objects, never freed (see predict)


def predict_here(case: Case) -> Plan:
    """The prediction in this process (once per process: ``predict``)."""
    import peftkit

    options, config, task, adapter_config = _checked(case)
    notes: list[str] = []
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor")
        model = build_model(config, task, case.num_labels)
        base = list(model.parameters()) + list(model.buffers())
        base_keys = {_key(t) for t in base}
        weights = _unique_bytes(base)
        dequantized = 0
        if options.quant_type:
            layers = quantized_layers(model)
            dense = {_key(m.weight): m.weight for m in layers}
            weights -= _unique_bytes(dense.values())
            weights += sum(four_bit_bytes(w.numel()) for w in dense.values())
            dequantized = max(w.numel() * 4 for w in dense.values())
            notes.append(f"weights: the 4-bit base; loading it needs the float base first ({human(_unique_bytes(base))})")
        with _moves_in_place():
            prepare(model, options, adapter_config)
        if case.gradient_checkpointing:
            enable_checkpointing(model)
        everything = list(model.parameters()) + list(model.buffers())
        adapter = _unique_bytes(t for t in everything if _key(t) not in base_keys)
        params = {_key(p): p for p in model.parameters()}
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        total = sum(p.numel() for p in params.values())
        if adapter_config is None:
            file_bytes = _unique_bytes(model.parameters())
        else:
            file_bytes = _unique_bytes(peftkit.io.adapter_tensors(model, "default").values())
        vocab = getattr(config, "vocab_size", None) or 1000
        batch = fake_batch(task, case.batch_size, case.max_length, vocab)
        live = Live(everything + list(batch.values()))
        handles = [p.register_post_accumulate_grad_hook(lambda q: live.tag(q.grad, "grad"))
                   for p in params.values() if p.requires_grad]
        holder: list[torch.optim.Optimizer] = []
        losses: list[torch.Tensor] = []

        def tag_state() -> None:
            for state in holder[0].state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor):
                        live.tag(t, "opt")

        with live:
            holder.append(train_steps(model, batch, task, options, device_type="cpu", on_step=tag_state,
                                      on_optimizer=holder.append, keep=losses))
        for h in handles:
            h.remove()
        # Never freed in this process: a trained model of fake tensors freed (its loss above all)
        # can crash the process later (torch 2.13, seen in repeated predictions; predict_many).
        _KEEP.append((holder, model, batch, everything, base, params, losses, live))
    gradients, opt = live.kind_at_peak["grad"], live.kind_at_peak["opt"]
    activations = live.peak - gradients - opt + dequantized
    peak = weights + adapter + gradients + opt + activations
    validated = case.device == "cpu" and not case.bf16 and options.method in VALIDATED_CPU
    if case.device == "cuda":
        notes.append("cuda: the same arithmetic as the CPU's (CUDA's kernels and caching allocator are not "
                     "modelled); not validated against torch.cuda.max_memory_allocated")
    else:
        notes.append("cpu: with glibc's default malloc the RSS can be well above this (freed activations stay in "
                     "its heap; BENCHMARKS.md); MALLOC_MMAP_THRESHOLD_=65536 keeps a run at the plan (docs/plan.md)")
    if case.device == "cpu" and not validated:
        what = "bf16 autocast" if case.bf16 else f"--method {case.method}"
        notes.append(f"not validated: {what} was not measured (validated on the CPU in float32: "
                     f"{', '.join(VALIDATED_CPU)})")
    return Plan(case, task, config.model_type, weights, adapter, gradients, opt, activations, peak,
                trainable, total, file_bytes, validated, notes)

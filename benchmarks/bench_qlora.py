"""QLoRA against LoRA, peftkit beside HF PEFT: weight memory, peak training memory, step time.

Each variant runs in a fresh subprocess of this script (so peak memory is its own): a
Llama-architecture model built from a config (random weights), LoRA r=16 on every linear
layer, ``--steps`` AdamW steps on random tokens after two warm-up steps.

- ``peftkit-lora`` / ``hf-lora``: LoRA over the float base;
- ``peftkit-qlora`` / ``hf-qlora``: the same over the base quantized to NF4 with double
  quantization by ``peftkit.quantize`` (bitsandbytes ``Linear4bit``; HF PEFT's LoRA wraps
  those layers itself), after ``prepare_for_kbit_training`` (peftkit's or HF PEFT's).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on the CPU the
process's peak resident set during the timed steps (``VmHWM``, reset after the model is built
and quantized), which includes the Python runtime and libraries (the same for every variant). Weight memory: ``peftkit.quant.weight_bytes`` of the base.

    .venv/bin/python benchmarks/bench_qlora.py                          # CPU, a 4 x 1024 Llama
    PYTHONPATH=src python benchmarks/bench_qlora.py --size 1b --device cuda --dtype bf16 \\
        --variants peftkit-qlora peftkit-lora --batch 8 --length 512      # the GPU check (~1.1B params)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SIZES = {  # Llama shapes: hidden, intermediate, layers, heads, kv heads, vocab
    "small": (1024, 2816, 4, 16, 8, 8000),
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B's shape
}
VARIANTS = ("peftkit-lora", "hf-lora", "peftkit-qlora", "hf-qlora")


def build(size: str, dtype, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def _reset_cpu_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _cpu_peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(args) -> dict:
    import torch

    import peftkit

    dtype = getattr(torch, args.dtype)
    library, kind = args.variant.split("-")
    model = build(args.size, dtype, args.device)
    params = sum(p.numel() for p in model.parameters())
    if kind == "qlora":
        peftkit.quantize(model, compute_dtype=dtype)
    weights = peftkit.quant.weight_bytes(model)
    if library == "peftkit":
        if kind == "qlora":
            peftkit.prepare_for_kbit_training(model, gradient_checkpointing=False)
        peftkit.apply(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    else:
        import peft

        for p in model.parameters():
            p.requires_grad_(False)
        if kind == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = SIZES[args.size][5]
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0)).to(args.device)
    model.train()

    def step():
        with torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(2):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:  # the float model built before quantizing must not count: restart the peak here
        gc.collect()
        _reset_cpu_peak()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _cpu_peak()
    return {"variant": args.variant, "size": args.size, "params": params, "device": args.device, "dtype": args.dtype,
            "batch": args.batch, "length": args.length, "step_ms": round(1000 * step_s, 1),
            "tokens_per_s": round(args.batch * args.length / step_s, 1), "peak_mb": round(peak / 2**20, 1),
            "weight_mb_4bit": round(weights["quantized_bytes"] / 2**20, 1),
            "weight_mb_dense": round(weights["dense_bytes"] / 2**20, 1), "trainable": sum(p.numel() for p in trainable)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in a subprocess
    parser.add_argument("--size", default="small", choices=SIZES)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.dtype == "bf16":
        args.dtype = "bfloat16"
    if args.variant:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_variant(args)), flush=True)
        return
    results = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in (("size", args.size), ("device", args.device), ("dtype", args.dtype),
                                      ("batch", args.batch), ("length", args.length), ("steps", args.steps),
                                      ("threads", args.threads))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{variant}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)
    by = {r["variant"]: r for r in results}
    for lib in ("peftkit", "hf"):
        q, f = by.get(f"{lib}-qlora"), by.get(f"{lib}-lora")
        if q and f:
            print(f"{lib}: qlora/lora step time {q['step_ms'] / f['step_ms']:.2f}, peak memory "
                  f"{q['peak_mb'] / f['peak_mb']:.2f}, base weights {q['weight_mb_4bit'] + q['weight_mb_dense']:.0f} MB "
                  f"vs {f['weight_mb_dense']:.0f} MB")
    for kind in ("lora", "qlora"):
        ours, theirs = by.get(f"peftkit-{kind}"), by.get(f"hf-{kind}")
        if ours and theirs:
            print(f"{kind}: peftkit/hf step time {ours['step_ms'] / theirs['step_ms']:.2f}, "
                  f"peak memory {ours['peak_mb'] / theirs['peak_mb']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

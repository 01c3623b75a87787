"""Serving many LoRA adapters at once: a mixed-adapter batch beside one adapter, the base model
and HF PEFT, in one process.

The model is a 56M-parameter Llama built from a config (hidden 512, 8 layers, intermediate
1376, 8 heads, 4 key/value heads, vocabulary 32000; random weights, seed 0) with 8 LoRA
adapters (r=16, all linear layers, non-zero B), saved by peftkit and loaded by both
libraries from the same files. 32 rows, row i with adapter i mod 8 (``--spread``), or
``--skew`` (half the rows on one adapter). For each library it times:

- ``base``: adapters disabled; ``single``: every row with adapter a0 (the active adapter);
  ``mixed``: ``adapter_names=`` with the rows spread over the 8 adapters;
- at *prefill* (32 × 128 tokens, a fresh KV cache, logits of the last position as
  ``generate`` asks) and at *decode* (32 × 1 token over a 128-token cache, cropped back after
  each step).

Each library's variants are timed round-robin in blocks, the blocks of the two libraries
alternating (``measure`` says why).

peftkit's mixed batch is also timed with each low-rank path forced (``grouped``, ``per_row``),
which is how the automatic choice was set. Medians in milliseconds and the ratios.

    .venv/bin/python benchmarks/bench_serving.py [--rounds 5] [--threads 2] [--json FILE]

Run it with OpenMP's default wait policy (not ``OMP_WAIT_POLICY=PASSIVE``, which ``make test``
sets): with passive threads every operator pays a thread wake-up, which charges a path by its
number of small operators rather than its work (see BENCHMARKS.md for both).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ADAPTERS = 8
ROWS = 32


def build_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def build_models(base, workdir: str):
    """peftkit's model and HF PEFT's, each with the same 8 adapters (peftkit's files)."""
    import peft

    import peftkit

    ours = copy.deepcopy(base)
    names = [f"a{i}" for i in range(ADAPTERS)]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        peftkit.apply(ours, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                               init_lora_weights=False, task_type="CAUSAL_LM"), name=name)
        peftkit.save(ours, os.path.join(workdir, name), name=name)
    ours.eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(workdir, names[0]), adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(os.path.join(workdir, name), adapter_name=name)
    theirs.eval()
    return ours, theirs, names


def prefill_call(model, ids, **extra):
    from transformers import DynamicCache

    def run():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=DynamicCache(),
                  use_cache=True, logits_to_keep=1, **extra)
    return run


def decode_call(model, ids, step, **extra):
    """One decoding step over a 128-token cache built once; the cache is cropped back after it."""
    with torch.no_grad():
        from transformers import DynamicCache

        cache = DynamicCache()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True,
              logits_to_keep=1, **extra)
    length = ids.shape[1]
    mask = torch.ones(ids.shape[0], length + 1, dtype=torch.long)

    def run():
        with torch.no_grad():
            model(input_ids=step, attention_mask=mask, cache=cache, use_cache=True, **extra)
        cache.crop(-1)
    return run


def measure(calls: dict, rounds: int, per_block: int) -> dict[str, float]:
    """Median per variant. A block times one library's variants round-robin (``per_block`` calls
    of each, after one untimed call each); the libraries' blocks alternate ``rounds`` times.
    Interleaving single calls of both libraries would charge each one for the other's memory
    churn (HF PEFT's mixed batch allocates per sub-batch): on this machine that made every
    peftkit decode variant 30-50 % slower than alone."""
    libraries = sorted({name.split("_")[0] for name in calls})
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for lib in libraries:
            mine = {n: fn for n, fn in calls.items() if n.split("_")[0] == lib}
            for fn in mine.values():
                fn()
            for _ in range(per_block):
                for name, fn in mine.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(v) for name, v in times.items()}


def variants(ours, theirs, names, rows: list[str], make):
    """The calls to time for one phase; ``make(model, **extra)`` builds one."""
    import peftkit
    from peftkit import serving

    class Forced:
        def __init__(self, fn, path):
            self.fn, self.path = fn, path

        def __call__(self):
            serving.FORCE_PATH = self.path
            try:
                self.fn()
            finally:
                serving.FORCE_PATH = None

    def inside(fn, context):
        def run():
            with context():
                fn()
        return run

    def active(fn, model, set_active):
        def run():
            set_active(model, names[0])
            fn()
        return run

    calls = {
        "peftkit_base": inside(make(ours), lambda: peftkit.disabled(ours)),
        "peftkit_single": active(make(ours), ours, peftkit.set_active),
        "peftkit_mixed": make(ours, adapter_names=rows),
        "peftkit_mixed_grouped": Forced(make(ours, adapter_names=rows), "grouped"),
        "peftkit_mixed_per_row": Forced(make(ours, adapter_names=rows), "per_row"),
        "hf_base": inside(make(theirs), theirs.disable_adapter),
        "hf_single": active(make(theirs), theirs, lambda m, n: m.set_adapter(n)),
        "hf_mixed": make(theirs, adapter_names=rows),
    }
    return calls


def ratios(ms: dict[str, float]) -> dict[str, float]:
    return {
        "peftkit_mixed_over_single": ms["peftkit_mixed"] / ms["peftkit_single"],
        "peftkit_single_over_base": ms["peftkit_single"] / ms["peftkit_base"],
        "hf_mixed_over_single": ms["hf_mixed"] / ms["hf_single"],
        "hf_single_over_base": ms["hf_single"] / ms["hf_base"],
        "hf_mixed_over_peftkit_mixed": ms["hf_mixed"] / ms["peftkit_mixed"],
        "grouped_over_per_row": ms["peftkit_mixed_grouped"] / ms["peftkit_mixed_per_row"],
    }


def check_equal(ours, theirs, rows, ids) -> float:
    with torch.no_grad():
        a = ours(input_ids=ids[:, :16], adapter_names=rows).logits
        b = theirs(input_ids=ids[:, :16], adapter_names=rows).logits
    return float((a - b).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--skew", action="store_true", help="half the rows on a0, the rest spread")
    parser.add_argument("--phases", default="decode,prefill", help="which of decode,prefill to time")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    base = build_base()
    with tempfile.TemporaryDirectory() as workdir:
        ours, theirs, names = build_models(base, workdir)
    del base
    if args.skew:
        rows = [names[0] if i < ROWS // 2 else names[1 + i % (ADAPTERS - 1)] for i in range(ROWS)]
    else:
        rows = [names[i % ADAPTERS] for i in range(ROWS)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32000, (ROWS, args.length), generator=g)
    step = torch.randint(1, 32000, (ROWS, 1), generator=g)
    diff = check_equal(ours, theirs, rows, ids)
    print(f"max |peftkit - HF PEFT| logits of the mixed batch: {diff:.2e}", flush=True)
    result = {"rows": rows, "length": args.length, "rounds": args.rounds, "threads": args.threads,
              "max_abs_diff_vs_hf": diff, "torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__, "cpu": platform.processor() or platform.machine(),
              "avx512_bf16": "avx512_bf16" in open("/proc/cpuinfo").read()}
    for phase, make, per_block in (  # decoding steps are short: ten calls a block
        ("decode", lambda m, **kw: decode_call(m, ids, step, **kw), 10),
        ("prefill", lambda m, **kw: prefill_call(m, ids, **kw), 1),
    ):
        if phase not in args.phases.split(","):
            continue
        ms = measure(variants(ours, theirs, names, rows, make), args.rounds, per_block)
        result[phase] = {"ms": ms, **ratios(ms)}
        print(phase, json.dumps(result[phase], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

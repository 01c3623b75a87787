"""Memory per process of QLoRA under FSDP (``peftkit train --method qlora --fsdp``), from a config.

Not a run: the arithmetic of what each process holds while training a Llama-architecture model
(a transformers ``config.json``, or the built-in Llama-2-70B shape) with peftkit as it is:

- the base loaded in float32 (``train/models.py``), every linear layer of the blocks quantized to
  NF4 with double quantization (``peftkit.quantize``: 0.5 byte a weight for the packed codes, plus
  the block scales); embeddings, norms and ``lm_head`` stay float32 (``quantize`` leaves heads
  and non-linear layers out);
- FSDP2 ``fully_shard`` per decoder block, then the root (``train/distributed.py``): every
  parameter -- the 4-bit codes, the float32 embeddings / head / norms, the adapter -- split
  evenly across the processes. Not sharded: the 4-bit layers' quantization state (block scales
  and the double-quantization tables are not parameters: every process holds all of them);
- LoRA r on every linear layer of the blocks (``--targets all-linear``), float32, with its
  gradient and AdamW's two moments, all sharded (16 bytes a parameter, divided by the processes);
- gathered while in use: one block's whole parameters and the next one's (FSDP2 prefetches one
  all-gather ahead), and the root's (embeddings, final norm, ``lm_head``: FSDP2 keeps the root
  gathered from its forward to its backward);
- activations saved for the backward pass, per token, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` on small Llamas in exactly this setup (4-bit base
  with a float32 compute dtype, LoRA on every linear layer, float32 residual stream; ``--bf16``
  autocast or float32) and fitted to the shape -- the fit is exact (integer coefficients, zero
  residual), ``--measure`` repeats it:

      per layer and token:  24 h + c_f f + c_kv kv_dim + 4 heads + 7 r s + 8   bytes
                            (bf16 autocast: c_f = 14, c_kv = 4, s = 2; float32: 16, 8, 4)
      head (final norm, lm_head, loss) per token:  4 h + 4 vocab + 12 bytes

  plus, in the backward pass, the logits' gradient (float32 and its bfloat16 copy under
  autocast: 6 bytes x vocab a token; 4 in float32). With gradient checkpointing a block keeps
  only its float32 input (4 h bytes a token) and one block's activations exist again while it
  is recomputed.

Not counted: the CUDA context, NCCL's buffers, the caching allocator's fragmentation, and the
loading of the base: peftkit loads the whole float32 model in every process before quantizing
and sharding it (see docs/scale.md).

    .venv/bin/python benchmarks/fsdp_memory.py                    # Llama-2-70B, 2/4/8 GPUs, 1 x 4096 tokens
    .venv/bin/python benchmarks/fsdp_memory.py --config path/to/config.json --world 8 --batch 2 --seq 2048
    PYTHONPATH=src .venv/bin/python benchmarks/fsdp_memory.py --measure   # re-fit the activation terms (CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

GIB = 2 ** 30

# Llama-2-70B's config.json (the fields this arithmetic reads)
LLAMA2_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False}

# saved-for-backward bytes per token, measured (``--measure``); see the docstring
ACTIVATION = {  # precision: (per h, per intermediate, per kv_dim, per head, bytes of an r-vector, constant)
    "bf16": (24, 14, 4, 4, 2, 8),
    "fp32": (24, 16, 8, 4, 4, 8),
}
HEAD = (4, 4, 12)  # per h, per vocab entry, constant
LOGIT_GRAD = {"bf16": 6, "fp32": 4}  # bytes per vocab entry and token in the backward pass


@dataclass
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        return cls(cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"],
                   cfg.get("num_key_value_heads") or cfg["num_attention_heads"], cfg["vocab_size"],
                   bool(cfg.get("tie_word_embeddings", False)))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """One block's linear layers: (name, in, out)."""
        h, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_dim, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)]


def nf4_bytes(n: int, double_quant: bool = True, blocksize: int = 64) -> tuple[int, int]:
    """(packed codes, quantization state) of one 4-bit layer of ``n`` weights, as bitsandbytes
    stores them: two codes a byte; one absmax per block of 64 (uint8 when double-quantized, with
    a float32 absmax per 256 of those, a 256-entry float32 table and a float32 offset; float32
    otherwise) and the 16-entry NF4 table."""
    blocks = math.ceil(n / blocksize)
    if double_quant:
        state = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
    else:
        state = 4 * blocks
    return math.ceil(n / 2), state + 4 * 16


def per_process(shape: Shape, world: int, tokens: int, r: int = 16, precision: str = "bf16",
                checkpointing: bool = False) -> dict[str, float]:
    """Bytes one of ``world`` processes holds at its peak, by part (see the module docstring)."""
    h, L = shape.hidden, shape.layers
    codes = state = lora = 0
    for _, n_in, n_out in shape.linears():
        c, s = nf4_bytes(n_in * n_out)
        codes, state, lora = codes + c, state + s, lora + r * (n_in + n_out)
    block_norms = 2 * h
    dense_root = shape.vocab * h * (1 if shape.tied else 2) + h  # embeddings, lm_head, final norm
    dense = L * block_norms + dense_root  # float32 parameters
    sharded = {
        "4-bit codes": L * codes / world,
        "float32 base (embeddings, lm_head, norms)": 4 * dense / world,
        "LoRA weights + grads + AdamW (fp32)": 16 * L * lora / world,
    }
    replicated = {"quantization state (every process)": L * state}
    gathered = {
        # the block in use and the prefetched next: codes, norms, adapter and its unsharded gradient
        "2 gathered blocks": 2 * (codes + 4 * block_norms + 8 * lora),
        "gathered root (embeddings, lm_head)": 4 * dense_root,
    }
    ch, cf, ckv, chead, sr, c0 = ACTIVATION[precision]
    layer = ch * h + cf * shape.intermediate + ckv * shape.kv_dim + chead * shape.heads + 7 * r * sr + c0
    head = HEAD[0] * h + HEAD[1] * shape.vocab + HEAD[2] + LOGIT_GRAD[precision] * shape.vocab
    if checkpointing:
        acts = tokens * (L * 4 * h + layer + head)
    else:
        acts = tokens * (L * layer + head)
    parts = {**sharded, **replicated, **gathered, "activations": acts}
    parts["total"] = sum(parts.values())
    return parts


def table(shape: Shape, worlds: list[int], tokens: int, r: int, precision: str) -> list[dict]:
    rows = []
    for world in worlds:
        for ckpt in (False, True):
            parts = per_process(shape, world, tokens, r, precision, ckpt)
            rows.append({"processes": world, "gradient_checkpointing": ckpt,
                         **{k: round(v / GIB, 2) for k, v in parts.items()}})
    return rows


def counts(shape: Shape, r: int) -> dict[str, int]:
    quantized = shape.layers * sum(i * o for _, i, o in shape.linears())
    dense = shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.hidden * (2 * shape.layers + 1)
    lora = shape.layers * sum(r * (i + o) for _, i, o in shape.linears())
    return {"base_params": quantized + dense, "quantized_params": quantized, "dense_params": dense, "lora_params": lora}


def markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("processes", "gradient_checkpointing")]
    head = "| GPUs | checkpointing | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for row in rows:
        cells = [f"{row[k]:.2f}" if k != "total" else f"**{row[k]:.1f}**" for k in keys]
        lines.append(f"| {row['processes']} | {'yes' if row['gradient_checkpointing'] else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- --measure: where ACTIVATION and HEAD come from ----------------------------------------------


def _saved_bytes(h: int, f: int, heads: int, kv: int, vocab: int, seq: int, bf16: bool, r: int) -> tuple[float, float]:
    """Bytes saved for backward by the second block and by the head (final norm, lm_head, loss)
    of a 2-block Llama with peftkit's QLoRA setup, each storage counted once."""
    import peftkit
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=2 * seq)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    peftkit.quantize(model)
    peftkit.apply(model, peftkit.LoraConfig(r=r, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    where, storages = ["embed"], {}

    def pack(t):
        st = t.untyped_storage()
        storages.setdefault(st.data_ptr(), (where[0], st.nbytes()))
        return t

    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"block{i}"))
        block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "head"))
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids, labels=ids)
    part = {}
    for section, nbytes in storages.values():
        part[section] = part.get(section, 0) + nbytes
    return part.get("block1", 0), part.get("head", 0)


def measure(r: int = 16) -> dict:
    """Fit the per-token terms: saved bytes at two sequence lengths (the difference is per token;
    per-layer constants such as the autocast copies of the adapter cancel), over shapes that vary
    h, intermediate, kv heads and heads independently."""
    import numpy as np

    shapes = [(256, 896, 2, 1), (512, 896, 4, 1), (256, 1792, 2, 1), (256, 896, 2, 2), (256, 896, 4, 2), (384, 1024, 6, 3)]
    out = {}
    for precision in ("bf16", "fp32"):
        rows, ys, heads_x, heads_y = [], [], [], []
        for (h, f, heads, kv), vocab in zip(shapes, (1000, 1000, 2000, 1500, 1000, 3000)):
            a = _saved_bytes(h, f, heads, kv, vocab, 64, precision == "bf16", r)
            b = _saved_bytes(h, f, heads, kv, vocab, 128, precision == "bf16", r)
            rows.append([h, f, kv * h // heads, heads, 1])
            ys.append((b[0] - a[0]) / 64)
            heads_x.append([h, vocab, 1])
            heads_y.append((b[1] - a[1]) / 64)
        coef, *_ = np.linalg.lstsq(np.array(rows, float), np.array(ys), rcond=None)
        hcoef, *_ = np.linalg.lstsq(np.array(heads_x, float), np.array(heads_y), rcond=None)
        fit = max(np.abs(np.array(rows) @ coef - np.array(ys)).max(),
                  np.abs(np.array(heads_x) @ hcoef - np.array(heads_y)).max())
        ch, cf, ckv, chead, sr, c0 = ACTIVATION[precision]
        coef, hcoef = [round(float(c), 3) for c in coef], [round(float(c), 3) for c in hcoef]
        out[precision] = {"per_h": coef[0], "per_intermediate": coef[1], "per_kv_dim": coef[2], "per_head": coef[3],
                          "constant": coef[4], "max_residual": float(fit), "head_per_h": hcoef[0],
                          "head_per_vocab": hcoef[1], "head_constant": hcoef[2],
                          "stored": {"per_h": ch, "per_intermediate": cf, "per_kv_dim": ckv, "per_head": chead,
                                     "constant": 7 * r * sr + c0, "head": list(HEAD)}}
    out["nf4_bytes_check"] = _check_nf4_bytes()
    return out


def _check_nf4_bytes() -> dict:
    """``nf4_bytes`` against what bitsandbytes stores for one layer."""
    import peftkit
    import torch

    layer = peftkit.quantize(torch.nn.Sequential(torch.nn.Linear(1000, 300)), skip_modules=[])[0]
    w = layer.weight
    s = w.quant_state
    state = (s.absmax.numel() * s.absmax.element_size() + s.code.numel() * s.code.element_size()
             + s.state2.absmax.numel() * s.state2.absmax.element_size()
             + s.state2.code.numel() * s.state2.code.element_size() + 4)
    codes, expected_state = nf4_bytes(300 * 1000)
    return {"codes": [codes, w.numel() * w.element_size()], "state": [expected_state, state]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a transformers config.json (Llama architecture); default: Llama-2-70B")
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4, 8], help="processes (GPUs)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per process per micro-batch")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--precision", choices=sorted(ACTIVATION), default="bf16", help="bf16: --bf16 autocast")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--measure", action="store_true", help="re-fit the activation terms on the CPU and stop")
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.r), indent=1, default=float))
        return 0
    cfg = LLAMA2_70B
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            cfg = json.load(f)
    shape = Shape.from_config(cfg)
    tokens = args.batch * args.seq
    rows = table(shape, args.world, tokens, args.r, args.precision)
    c = counts(shape, args.r)
    print(f"{json.dumps(asdict(shape))}\nparameters: base {c['base_params'] / 1e9:.2f}B ({c['quantized_params'] / 1e9:.2f}B "
          f"in 4-bit layers, {c['dense_params'] / 1e6:.0f}M float32), LoRA r={args.r} all-linear "
          f"{c['lora_params'] / 1e6:.1f}M\nper process, GiB; {args.batch} x {args.seq} tokens a micro-batch per process, "
          f"{args.precision}:\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"shape": asdict(shape), "counts": c, "tokens_per_process": tokens, "r": args.r,
                       "precision": args.precision, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

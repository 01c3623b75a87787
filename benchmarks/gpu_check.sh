#!/usr/bin/env bash
# The GPU checks, in one short script for a session that is lent a CUDA device (run from the
# repository root; needs torch with CUDA, bitsandbytes, transformers and peft installed):
#   1. QLoRA against LoRA on a ~1.1B Llama in bf16, beside HF PEFT (bench_qlora.py);
#   2. `peftkit train --task causal-lm` on a 4-layer Llama in bf16: plain, with gradient
#      checkpointing, and as QLoRA -- seconds per step and peak GPU memory from summary.json.
# Results go to ${OUT:-gpu-check}/ (JSON lines and the run directories).
# SMOKE=1 runs a shrunken version on the CPU (no QLoRA benchmark): a check of the script itself.
set -euo pipefail
OUT=${OUT:-gpu-check}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
export PYTHONPATH=src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
if [ "$SMOKE" = 1 ]; then
    HIDDEN=64 INTER=128 LENGTH=64 STEPS=2
else
    HIDDEN=2048 INTER=5632 LENGTH=512 STEPS=30
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
    python benchmarks/bench_qlora.py --size 1b --device cuda --dtype bfloat16 \
        --variants peftkit-qlora peftkit-lora hf-qlora hf-lora --batch 8 --length 512 | tee "$OUT/qlora.jsonl"
fi

python - "$OUT" "$HIDDEN" "$INTER" "$LENGTH" <<'PY'
import json, sys
from pathlib import Path
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out, hidden, inter, length = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
words = [f"w{i}" for i in range(4000)]
tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}, unk_token="<unk>"))
tk.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(words) + 4, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=4,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
LlamaForCausalLM(cfg).save_pretrained(out / "llama")
tok.save_pretrained(out / "llama")
g = torch.Generator().manual_seed(0)
with open(out / "train.jsonl", "w") as f:
    for _ in range(512):
        n = int(torch.randint(length // 10, length * 3 // 4, (1,), generator=g))
        ids = torch.randint(0, len(words), (n,), generator=g).tolist()
        f.write(json.dumps({"prompt": " ".join(words[i] for i in ids[: n // 4]),
                            "response": " ".join(words[i] for i in ids[n // 4:])}) + "\n")
PY

run() {  # name, extra flags
    python -m peftkit train --model "$OUT/llama" --data "$OUT/train.jsonl" --max-length "$LENGTH" --batch-size 8 \
        --max-steps "$STEPS" --bf16 --packing --out "$OUT/$1" --quiet "${@:2}"
    python -c "import json,sys; s=json.load(open('$OUT/$1/summary.json')); print(json.dumps({'run': '$1', \
's_per_step': s['train_seconds'] / s['steps'], 'peak_gpu_gib': (s['peak_gpu_bytes'] or 0) / 2**30, \
'base_gib': sum(s['base_bytes'].values()) / 2**30, 'eval_loss': s['eval']['loss']}))" | tee -a "$OUT/train_runs.jsonl"
}
run lora-bf16
run lora-bf16-gc --gradient-checkpointing
run qlora-bf16 --method qlora

#!/usr/bin/env bash
# SST-2 with the trainer: plain LoRA beside LoRA+ (--loraplus-lr-ratio 16), 3 seeds each, on
# all-MiniLM-L6-v2 (r 8, alpha 16, query/value, batch 32, length 64, 250 steps), evaluated on
# ../shared/data/sst2/test.tsv: plain LoRA at lr 2e-3; LoRA+ at the same lr (B at 3.2e-2) and at
# lr 2.5e-4 (B at 4e-3, about plain LoRA's rate). Two runs at a time, one thread each; then the summary.
#     bash benchmarks/sst2_loraplus.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/sst2-loraplus}
data=../shared/data/sst2
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
run() {  # variant seed
    local extra="--lr 2e-3"
    [ "$1" = loraplus16 ] && extra="--lr 2e-3 --loraplus-lr-ratio 16"
    [ "$1" = loraplus16_lr2.5e-4 ] && extra="--lr 2.5e-4 --loraplus-lr-ratio 16"
    [ -f "$out/$1-s$2/summary.json" ] || .venv/bin/peftkit train --model minilm --data $data/train.tsv \
        --eval-data $data/test.tsv --method lora --r 8 --alpha 16 --targets query,value --max-steps 250 \
        --batch-size 32 --max-length 64 --seed "$2" $extra --out "$out/$1-s$2" --quiet
}
for seed in 0 1 2; do
    run lora "$seed" & run loraplus16 "$seed" & wait
done
run loraplus16_lr2.5e-4 0 & run loraplus16_lr2.5e-4 1 & wait
run loraplus16_lr2.5e-4 2
.venv/bin/python - "$out" <<'PY'
import json, statistics as st, sys
out = sys.argv[1]
for v in ("lora", "loraplus16", "loraplus16_lr2.5e-4"):
    acc = [100 * json.load(open(f"{out}/{v}-s{s}/summary.json"))["eval"]["accuracy"] for s in range(3)]
    print(f"{v}: {st.mean(acc):.2f} ± {st.stdev(acc):.2f} ({', '.join(f'{a:.2f}' for a in acc)})")
PY

#!/usr/bin/env bash
# The sparse-training experiment of the long-context GPT issue, on one GPU:
#   bash benchmarks/train_experiments.sh OUT_DIR [ITERS_8K] [ITERS_16K]      (0 iterations: skip that length)
# Same model, data, seed and number of steps for every attention; writes OUT_DIR/train-summary.jsonl (one line
# per run: iteration time, tokens/s, final validation loss) and OUT_DIR/train-logs.tar.gz (every log.jsonl).
set -uo pipefail
out=${1:?usage: train_experiments.sh OUT_DIR [ITERS_8K] [ITERS_16K]}
it8=${2:-150}
it16=${3:-100}
runs=$(mktemp -d)
mkdir -p "$out"
run() {  # preset iters name attn-args...
  local preset=$1 iters=$2 name=$3; shift 3
  echo "== $preset $name" >&2
  # warm-up: 10% of the run (at least 20 steps); validation 5 times per run, on the same windows every time
  local warmup=$(( iters / 10 > 20 ? iters / 10 : 20 )) every=$(( iters / 5 > 1 ? iters / 5 : 1 ))
  timeout 900 python3 -m flashring train --preset "$preset" --iters "$iters" --warmup "$warmup" \
      --eval-every "$every" --eval-iters 8 --log-every 50 --no-save --out "$runs/$preset-$name" "$@" 2>&1 \
      | tail -3 >&2
  python3 - "$runs/$preset-$name" "$preset" "$name" >> "$out/train-summary.jsonl" <<'PY'
import json, sys, pathlib
d, preset, name = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
s = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {"error": "no summary"}
print(json.dumps({**s, "preset": preset, "run": name}))
PY
}
for spec in "flash --attn flash" "sdpa --attn sdpa" "qk30 --attn qk-sparse --drop 0.3" "qk50 --attn qk-sparse --drop 0.5" \
            "hash16 --attn hash-sparse --buckets 16"; do
  [ "$it8" -gt 0 ] && run gpt-8k "$it8" $spec
done
for spec in "flash --attn flash" "qk50 --attn qk-sparse --drop 0.5" "hash16 --attn hash-sparse --buckets 16" \
            "sdpa --attn sdpa"; do
  [ "$it16" -gt 0 ] && run gpt-16k "$it16" $spec
done
tar -czf "$out/train-logs.tar.gz" -C "$runs" .
for preset in gpt-8k gpt-16k; do
  logs=$(ls "$runs"/$preset-*/log.jsonl 2>/dev/null)
  [ -n "$logs" ] && python3 -m flashring train plot $logs --out "$out/train-$preset.png" >&2
done
python3 - "$out/train-summary.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'preset':<8} {'attn':<7} {'ms/step':>8} {'tok/s':>9} {'val loss':>8} {'vs flash':>8} {'mem GiB':>8}")
base = {r["preset"]: r for r in rows if r["run"] == "flash"}
for r in rows:
    ms = r.get("iter_time_ms_median")
    b = base.get(r["preset"], {})
    bms = b.get("iter_time_ms_median")
    sp = f"{bms / ms:.2f}x" if ms and bms else "-"
    print(f"{r['preset']:<8} {r['run']:<7} {ms or 0:>8.1f} {r.get('tokens_per_s', 0):>9.0f} "
          f"{r.get('final_val_loss', float('nan')):>8.4f} {sp:>8} {r.get('peak_mem_gib') or 0:>8.1f}")
PY

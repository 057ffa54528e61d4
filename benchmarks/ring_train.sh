#!/usr/bin/env bash
# Experiment 2 of the long-context GPT issue: ring-attention training over all GPUs of one host.
#   bash benchmarks/ring_train.sh OUT_DIR SEQLEN ITERS [MAX_MINUTES] [NPROC]
# Trains the gpt3b-ring preset (or $PRESET) on SEQLEN-token sequences, each rank holding a zigzag shard (SEQLEN / NPROC tokens);
# --max-minutes (default 8) stops early but cleanly (final validation, summary). Writes OUT_DIR/ring-SEQLEN/
# (log.jsonl, summary.json) and OUT_DIR/ring-SEQLEN.png. Pair it with train_fit_probe.sh on one GPU of the same
# host for the single-GPU side of the comparison.
set -uo pipefail
out=${1:?usage: ring_train.sh OUT_DIR SEQLEN ITERS [MAX_MINUTES] [NPROC]}
seqlen=${2:?seqlen}
iters=${3:?iters}
minutes=${4:-8}
nproc=${5:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")}
mkdir -p "$out"
torchrun --standalone --nproc-per-node "$nproc" -m flashring train --preset "${PRESET:-gpt3b-ring}" --attn ring \
    --seqlen "$seqlen" --iters "$iters" --max-minutes "$minutes" --no-save --out "$out/ring-$seqlen"
rc=$?
python3 -m flashring train plot "$out/ring-$seqlen/log.jsonl" --out "$out/ring-$seqlen.png" || true
exit $rc

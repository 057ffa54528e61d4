#!/usr/bin/env bash
# Everything one GPU session checks and measures, in one command (each step time-boxed, logs kept):
#   bash benchmarks/gpu_run.sh OUT [STEPS]
# STEPS: a comma list from tests,dense,sparse,decode,varlen,tune,generate (default: all), and on request
# beforeafter (this checkout vs the one unpacked in .before/src, its sha in .before/SHA; carry .before), launch
# (ops.launch's switches: GPU test + launch_overhead.py), skipdropped (bench sparse with the dropped-tile skip off / on),
# decodehost (eager decode steps' host time, the same two trees), gluon (the Gluon Hopper
# forward, ops/hopper.py: check + time; GLUON_ARGS), gluonbwd (the Gluon backward, ops/hopper_bwd.py;
# GLUON_BWD_SEQLENS, GLUON_BWD_ARGS e.g. "--modes separate --headdims 64"),
# profile (a training step's kernels per arm; PROFILE_ARMS, PROFILE_EXTRA e.g. --cuda-graph), sparsetiles
# (benchmarks/sparse_tiles.py: the portable sparse backward against the Gluon one, with and without rows_out or
# gather, and the Gluon forward with copies or gather;
# SPARSE_TILES_PAIRS, SPARSE_TILES_SEQLENS), share
# (attention_share.py; SHARE_PRESET, default paper-16k) and paper
# (paper_experiments.py; PAPER_PRESET, PAPER_ARMS, PAPER_MINUTES per arm, default 3.2: a hash arm at 186 ms/step
# needs 2.9 for 920 steps). profile and paper train on the corpus directory carried in .corpus/english.
# Results files land in OUT (flashring bench's <device>-<suite>-<date>-<sha>.jsonl), logs in OUT/*.log; a
# summary is printed last.
set -uo pipefail
out=${1:?usage: gpu_run.sh OUT [STEPS]}
steps=${2:-tests,dense,sparse,decode,varlen,tune,generate}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
has() { [[ ",$steps," == *",$1,"* ]]; }
step() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  echo "== $name" >&2
  timeout "$secs" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $?" >> "$out/summary.txt"
}
: > "$out/summary.txt"
# -rfE --durations: the failures and the slowest tests in the log
has tests && step tests ${TESTS_SECS:-420} python3 -m pytest -m gpu -q -rfE --durations=25 --maxfail=20 \
    -n "${TESTS_WORKERS:-8}" -p no:cacheprovider ${TESTS_ARGS:-}
has dense && step dense 240 python3 -m flashring bench dense --providers flashring,sdpa-flash,sdpa-cudnn \
    --modes fwd,fwd+bwd --out "$out" --no-plot
has sparse && step sparse 150 python3 -m flashring bench sparse --quick --out "$out" --no-plot
has decode && step decode 150 python3 -m flashring bench decode --out "$out"
has varlen && step varlen 90 python3 -m flashring bench varlen --out "$out"
has tune && step tune "${TUNE_SECS:-150}" python3 -m flashring bench tune --seqlens ${TUNE_SEQLENS:-1k,8k} \
    --headdims ${TUNE_HEADDIMS:-128} --causal ${TUNE_CAUSAL:-yes} --passes ${TUNE_PASSES:-fwd,bwd} --out "$out"
has generate && step generate "${GENERATE_SECS:-150}" python3 benchmarks/hf_generate.py --out "$out" \
    --cache "${GENERATE_CACHE:-dynamic}" ${GENERATE_SHAPES:+--shapes "$GENERATE_SHAPES"}
has beforeafter && step beforeafter 240 python3 benchmarks/before_after.py --old .before/src \
    --old-sha "$(cat .before/SHA 2>/dev/null || echo unknown)" --quick --out "$out"
has decodehost && step decodehost 150 python3 benchmarks/decode_host.py --old .before/src \
    --old-sha "$(cat .before/SHA 2>/dev/null || echo unknown)" --out "$out"
# shellcheck disable=SC2086
has profile && step profile 240 python3 benchmarks/train_step_profile.py --data .corpus/english \
    --arms "${PROFILE_ARMS:-dense,qk50,hash16}" --out "$out" ${PROFILE_EXTRA:+--extra="$PROFILE_EXTRA"}
has gluon && step gluon "${GLUON_SECS:-240}" python3 benchmarks/gluon_fwd.py --out "$out" ${GLUON_ARGS:-}
# shellcheck disable=SC2086
has gluonbwd && step gluonbwd "${GLUON_BWD_SECS:-240}" python3 benchmarks/gluon_bwd.py --out "$out" \
    ${GLUON_BWD_SEQLENS:+--seqlens "$GLUON_BWD_SEQLENS"} ${GLUON_BWD_ARGS:-}
# shellcheck disable=SC2086
has sparsetiles && step sparsetiles "${SPARSE_TILES_SECS:-300}" python3 benchmarks/sparse_tiles.py --out "$out" \
    --seqlens "${SPARSE_TILES_SEQLENS:-8192,16384}" \
    --pairs "${SPARSE_TILES_PAIRS:-fwd 128x64/8w+bwd 64x64;fwd 128x64/8w+gluon;fwd 128x64/8w+gluon rows-out;fwd 128x64/8w+gluon gather;gluon+gluon;gluon gather+gluon gather}"
# launch: ops.launch's host-time switches, their GPU test, then each launch path's host time
has launch && step launch 120 bash -c "python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_launch.py && \
    python3 benchmarks/launch_overhead.py"
# skipdropped: the QK-sparse kernels with and without skipping tiles of dropped slots, CUDA-graph timings
for skip in 0 1; do
  has skipdropped && mkdir -p "$out/skip$skip" && FLASHRING_HOPPER_SKIP_DROPPED=$skip step "skipdropped$skip" 120 \
      python3 -m flashring bench sparse --seqlens 4k,16k --qk-drop 0.5,0.8 --hash-buckets 16 --cuda-graphs --no-flex \
      --no-sdpa --out "$out/skip$skip" --no-plot
done
has share && step share 150 python3 benchmarks/attention_share.py --preset "${SHARE_PRESET:-paper-16k}" --out "$out"
paper_arms=${PAPER_ARMS:-dense-strict hash16}
paper_minutes=${PAPER_MINUTES:-3.2}
# each arm: its training time plus ~30 s of start-up and validation; at most 590 s (the device's per-command cap)
paper_secs=$(python3 -c "print(min(590, int(len('$paper_arms'.split()) * ($paper_minutes * 60 + 30))))")
# shellcheck disable=SC2086
has paper && step paper "$paper_secs" python3 benchmarks/paper_experiments.py --preset "${PAPER_PRESET:-paper-8k}" \
    --data .corpus/english --iters "${PAPER_ITERS:-920}" --max-minutes "$paper_minutes" --out "$out/paper" \
    --extra=--cuda-graph $paper_arms
# the per-arm logs sit 4 directories deep, past what the device tool brings back: one archive instead
has paper && tar czf "$out/paper-runs.tar.gz" -C "$out/paper" runs 2>/dev/null
for f in "$out"/*.log; do echo "---- $(basename "$f")"; tail -n "${TAIL_LINES:-25}" "$f"; done
cat "$out/summary.txt"

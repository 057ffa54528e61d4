#!/usr/bin/env bash
# Which sequence lengths of one model fit one GPU, and how fast they train there:
#   bash benchmarks/train_fit_probe.sh OUT_DIR PRESET ITERS SEQLEN [SEQLEN ...]
# For each length a short single-process run of `flashring train --preset PRESET` (batch 1 for the ring preset;
# no checkpoint written). One JSON line per length in OUT_DIR/fit-probe.jsonl: exit code (3 = out of GPU memory,
# with flashring's message), peak GiB allocated, median ms/step and tokens/s over the steps after the first 3.
set -uo pipefail
out=${1:?usage: train_fit_probe.sh OUT_DIR PRESET ITERS SEQLEN...}
preset=${2:?preset}
iters=${3:?iters}
shift 3
mkdir -p "$out"
for n in "$@"; do
  echo "== $preset seqlen $n" >&2
  run="$out/$preset-$n"
  timeout 300 python3 -m flashring train --preset "$preset" --seqlen "$n" --iters "$iters" --eval-every 100000 \
      --eval-iters 1 --log-every 1 --no-save --out "$run" > "$run.out" 2> "$run.err"
  rc=$?
  tail -2 "$run.out" >&2; tail -2 "$run.err" >&2
  python3 - "$run" "$n" "$rc" >> "$out/fit-probe.jsonl" <<'PY'
import json, pathlib, sys
run, n, rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
row = {"seqlen": n, "exit_code": rc}
if (run / "summary.json").exists():
    s = json.loads((run / "summary.json").read_text())
    row.update({k: s.get(k) for k in ("peak_mem_gib", "iter_time_ms_median", "tokens_per_s", "mfu", "n_params",
                                      "timed_steps")})
    row["meta"] = {k: s["meta"].get(k) for k in ("device", "torch", "triton", "git_sha", "date")}
err = pathlib.Path(str(run) + ".err").read_text().strip().splitlines()
row["error"] = next((l for l in reversed(err) if "error" in l.lower()), None) if rc else None
print(json.dumps(row))
PY
done
python3 - "$out/fit-probe.jsonl" <<'PY'
import json, sys
print(f"{'seqlen':>7} {'fits':>5} {'peak GiB':>9} {'ms/step':>8} {'tok/s':>8} {'MFU':>6}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    fits = "yes" if r["exit_code"] == 0 else ("OOM" if r["exit_code"] == 3 else f"rc={r['exit_code']}")
    f = lambda k, spec: format(r[k], spec) if r.get(k) is not None else "-"  # noqa: E731
    print(f"{r['seqlen']:>7} {fits:>5} {f('peak_mem_gib', '9.1f')} {f('iter_time_ms_median', '8.0f')} "
          f"{f('tokens_per_s', '8.0f')} {f('mfu', '6.1%')}")
PY

"""Issue 14's training experiment: Pagliardini et al.'s recipe (`--preset paper-8k` / `paper-16k`), one arm per
attention, the same initialisation, data order and token budget for every arm.

    PYTHONPATH=src python3 benchmarks/paper_experiments.py --preset paper-8k --data CORPUS_DIR --iters 920 \
        --out OUT dense hash16 qk50 ...

Each arm is one `flashring train` process (seed 1234: the same initial weights for arms of one architecture and the
same training windows for all) writing OUT/runs/<preset>-<arm>/{log.jsonl,summary.json}; one line per arm is
appended to OUT/paper-summary.jsonl. `--max-minutes` (per arm) keeps a slow arm inside a time budget: it stops,
validates and still writes its summary (the row then says how many steps it reached). CORPUS_DIR is a corpus
directory that `--corpus english` built (train.bin, val.bin, meta.json), copied to the GPU machine so that every
machine trains on the same tokens. 920 steps x 32,768 tokens = 30.1M tokens per arm.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# arm -> `flashring train` options on top of the preset. The paper's arms are shared-QK with learned positions
# (the preset); hash arms use their hashing (unit-norm rotations, strictly causal buckets). ctrl-*: the model
# flashring trained before (separate q/k, RoPE; hash-sparse with its own hashing) as controls.
ARMS = {
    "dense": ["--attn", "flash"],
    "sdpa": ["--attn", "sdpa"],
    # shared-QK puts each row's highest score on its own key (q . q/|q| = |q|); the hash arms exclude it (strict
    # buckets), so the like-for-like dense baseline excludes it too
    "dense-strict": ["--attn", "flash", "--strict-causal"],
    "sdpa-strict": ["--attn", "sdpa", "--strict-causal"],
    "hash8": ["--attn", "hash-sparse", "--buckets", "8", "--lsh-unit-norm", "--strict-causal"],
    "hash16": ["--attn", "hash-sparse", "--buckets", "16", "--lsh-unit-norm", "--strict-causal"],
    "hash32": ["--attn", "hash-sparse", "--buckets", "32", "--lsh-unit-norm", "--strict-causal"],
    "qk30": ["--attn", "qk-sparse", "--drop", "0.3"],
    "qk50": ["--attn", "qk-sparse", "--drop", "0.5"],
    "ctrl-dense": ["--attn", "flash", "--no-shared-qk", "--positions", "rope"],
    "ctrl-hash16": ["--attn", "hash-sparse", "--buckets", "16", "--no-shared-qk", "--positions", "rope"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arms", nargs="+", help=f"any of {', '.join(ARMS)}")
    p.add_argument("--preset", default="paper-8k")
    p.add_argument("--data", required=True, help="corpus directory (train.bin, val.bin, meta.json)")
    p.add_argument("--iters", type=int, default=920)
    p.add_argument("--eval-every", type=int, default=92)
    p.add_argument("--max-minutes", type=float, default=0.0, help="per arm; 0 = no limit")
    p.add_argument("--out", required=True)
    p.add_argument("--extra", default="", help="more `flashring train` options for every arm (one string)")
    args = p.parse_args(argv)
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for arm in args.arms:
        run_dir = out / "runs" / f"{args.preset}-{arm}"
        cmd = [sys.executable, "-m", "flashring", "train", "--preset", args.preset, "--data", args.data,
               "--iters", str(args.iters), "--eval-every", str(args.eval_every), "--log-every", "10",
               "--no-save", "--progress", "off", "--out", str(run_dir), *ARMS[arm], *args.extra.split()]
        if args.max_minutes:
            cmd += ["--max-minutes", str(args.max_minutes)]
        print(f"== {arm}: {' '.join(cmd[3:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        summary = run_dir / "summary.json"
        row = json.loads(summary.read_text()) if rc == 0 and summary.exists() else {"error": f"exit {rc}"}
        row.update(preset=args.preset, run=arm, options=ARMS[arm], wall_s=round(time.time() - t0, 1))
        with open(out / "paper-summary.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"== {arm}: {row.get('steps')} steps, {row.get('iter_time_ms_median') or 0:.1f} ms/step, "
              f"val {row.get('final_val_loss')}, {row['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

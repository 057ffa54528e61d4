"""``flashring train plot LOGS... --out loss.png``: training and validation loss curves of ``log.jsonl`` files."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Tuple


def read_log(path: Path):
    """(records, bad line numbers): a line that does not parse (a run killed mid-write) is skipped and reported."""
    records, bad = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad.append(i)
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad.append(i)
    return records, bad


def points(records: List[dict], kind: str, key: str, scale: float) -> List[Tuple[float, float]]:
    """(step x scale, value) of the records of one type; a record whose step or value is not a number (edited
    by hand, or from another program) is left out rather than ending the plot in a TypeError."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    return [(r["step"] * scale, r[key]) for r in records
            if r.get("type") == kind and number(r.get("step")) and number(r.get(key))]


def training_seconds(records: List[dict]) -> dict:
    """step -> training wall-clock seconds up to and including that step: the running sum of the train records'
    ``dt_ms`` (validation and checkpoint time left out, as a run's speed is compared on training time)."""
    total, at = 0.0, {}
    for r in records:
        if r.get("type") == "train" and isinstance(r.get("dt_ms"), (int, float)) and isinstance(r.get("step"), int):
            total += r["dt_ms"] / 1e3
            at[r["step"]] = total
    return at


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="flashring train plot", description="plot training / validation loss curves")
    p.add_argument("logs", nargs="+", help="log.jsonl files written by flashring train --out")
    p.add_argument("--out", default="loss.png", help="image file to write")
    p.add_argument("--x", choices=("step", "tokens", "time"), default="step",
                   help="x axis; time = training wall-clock seconds (the sum of the steps' times)")
    args = p.parse_args(argv)
    for log in args.logs:
        if not Path(log).is_file():
            p.error(f"log file {log!r} does not exist")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("flashring train plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for i, log in enumerate(args.logs):
        records, bad = read_log(Path(log))
        if bad:
            print(f"flashring train plot: {log}: skipped {len(bad)} unreadable line(s): {bad[:10]}", file=sys.stderr)
        meta = next((r for r in records if r.get("type") == "meta"), {})
        c = meta.get("config", {})
        label = f"{c.get('attn', '?')} S={c.get('seqlen', '?')} ({Path(log).parent.name or log})"
        per_step = c.get("batch_size", 1) * c.get("seqlen", 1) * c.get("grad_accum", 1)
        scale = per_step if args.x == "tokens" else 1
        train = points(records, "train", "loss", scale)
        val = points(records, "val", "val_loss", scale)
        if args.x == "time":             # a resumed log restarts its steps' sum where its records start
            at = training_seconds(records)
            train = [(at[int(x)], y) for x, y in train if int(x) in at]
            val = [(at[int(x)], y) for x, y in val if int(x) in at]
        if not train and not val:
            p.error(f"{log} holds no train or val records")
        color = f"C{i % 10}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.5, linewidth=0.8, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), "o-", color=color, label=f"{label} val")
    ax.set_xlabel({"tokens": "tokens", "time": "training time (s)"}.get(args.x, "step"))
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        fig.savefig(args.out, dpi=120)
    except OSError as exc:
        print(f"flashring train plot: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0

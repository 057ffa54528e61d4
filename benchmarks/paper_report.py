"""Table and plots of issue 14's training experiment (benchmarks/paper_experiments.py + attention_share.py).

    python3 benchmarks/paper_report.py --summary S.jsonl --share A.jsonl --logs LOGDIR [--plots PREFIX]

S: paper_experiments.py's rows (one per arm; a `cuda_graph` flag may mark runs made with --cuda-graph). A:
attention_share.py's rows for the same preset (the attention core's ms per step, eager and replayed from a CUDA
graph). LOGDIR: the runs' directories (`<preset>-<arm>/log.jsonl`; subdirectories `graph/` and `eager/` when both
kinds were run) for the kept-pair fractions and the curves.

Per arm: steps and tokens, ms/step, validation loss and its change against the dense arm, the end-to-end speedup
over dense flashring and over SDPA, the kept-pair fraction (mean over layers, last logged step), and Amdahl's
prediction from the measured attention time: step(arm) = step(dense) - attn(dense) + attn(arm), where attn(arm) is
the core's time on random inputs (uniform buckets) and, for the ideal, attn(dense) x kept pairs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean


def rows_of(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def val_curve(log: Path):
    return {r["step"]: r["val_loss"] for r in rows_of(log) if r.get("type") == "val"}


def last_kept(log: Path):
    recs = [r for r in rows_of(log) if r.get("type") == "train" and r.get("kept_pairs")]
    return mean(recs[-1]["kept_pairs"]) if recs else None


def kept_plot(logs: Path, out: str) -> None:
    """Each sparse arm's kept-pair fraction per layer over training (one panel per arm, a line per layer): trained
    hash buckets are skewed, so the fraction of pairs a hash arm attends is measured, not assumed."""
    from matplotlib.figure import Figure
    arms = [(d.name, [r for r in rows_of(d / "log.jsonl") if r.get("type") == "train" and r.get("kept_pairs")])
            for d in sorted(logs.iterdir()) if (d / "log.jsonl").exists()]
    arms = [(name, recs) for name, recs in arms if recs]
    if not arms:
        return
    fig = Figure(figsize=(4.2 * len(arms), 3.6), layout="constrained")
    for ax, (name, recs) in zip(fig.subplots(1, len(arms), squeeze=False)[0], arms):
        steps = [r["step"] for r in recs]
        for layer in range(len(recs[0]["kept_pairs"])):
            ax.plot(steps, [r["kept_pairs"][layer] for r in recs], linewidth=0.9, label=f"layer {layer + 1}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("kept fraction of causal pairs")
    fig.axes[-1].legend(fontsize=6, ncol=2)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summary", required=True, type=Path)
    p.add_argument("--share", required=True, type=Path)
    p.add_argument("--logs", required=True, type=Path)
    p.add_argument("--plots", help="write PREFIX-tokens.png and PREFIX-time.png (validation loss) of the graph runs")
    args = p.parse_args(argv)
    runs = [r for r in rows_of(args.summary) if r.get("type") == "summary"]
    for r in runs:                    # a run made with --cuda-graph records it in its config
        r.setdefault("cuda_graph", bool(r.get("meta", {}).get("config", {}).get("cuda_graph")))
    share = {r["arm"]: r for r in rows_of(args.share) if r.get("type") == "result"}
    graph_runs = {r["run"]: r for r in runs if r.get("cuda_graph")}
    eager_runs = {r["run"]: r for r in runs if not r.get("cuda_graph")}
    base = graph_runs.get("dense")
    attn_key = "graph_ms_per_step"
    a_dense = share.get("dense", {}).get(attn_key)
    print("| arm | CUDA graph | steps | tokens | ms/step | tok/s | val loss | val vs dense (same step) "
          "| speedup vs dense flashring | vs SDPA | kept pairs | attention ms/step (isolated) | Amdahl: predicted "
          "| ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        arm, graph = r["run"], bool(r.get("cuda_graph"))
        ms = r["iter_time_ms_median"]
        c = r["meta"]["config"]
        toks = r["steps"] * c["batch_size"] * c["seqlen"] * c.get("grad_accum", 1)
        ref = graph_runs.get("dense") if graph else next((x for x in runs if x["run"] == "dense" and
                                                          not x.get("cuda_graph")), None)
        kind = args.logs / ("graph" if graph else "eager")
        logs = kind if kind.is_dir() else args.logs        # one kind of run only: no graph/ or eager/ level
        log = logs / f"{r['preset']}-{arm}" / "log.jsonl"
        ref_log = logs / f"{r['preset']}-dense" / "log.jsonl"
        dval = "-"
        if arm != "dense" and log.exists() and ref_log.exists():   # at the last validation both runs reached
            mine, theirs = val_curve(log), val_curve(ref_log)
            common = max(set(mine) & set(theirs), default=None)
            if common is not None:
                dval = f"{100 * (mine[common] / theirs[common] - 1):+.1f}%" + \
                    ("" if common == r["steps"] else f" (step {common})")
        kept = last_kept(log) if log.exists() else None
        attn = share.get(arm, {}).get(attn_key if graph else "ms_per_step")
        pred = ideal = "-"
        if graph and base and a_dense and attn is not None and arm not in ("dense", "sdpa"):
            pred = f"{base['iter_time_ms_median'] / (base['iter_time_ms_median'] - a_dense + attn):.2f}x"
            frac = kept if kept is not None else 1.0
            ideal = f"{base['iter_time_ms_median'] / (base['iter_time_ms_median'] - a_dense * (1 - frac)):.2f}x"
        sp = f"{ref['iter_time_ms_median'] / ms:.2f}x" if ref else "-"
        sdpa = (graph_runs if graph else eager_runs).get("sdpa")      # the same kind of run
        sv = f"{sdpa['iter_time_ms_median'] / ms:.2f}x" if sdpa else "-"
        print(f"| {arm} | {'yes' if graph else 'no'} | {r['steps']} | {toks / 1e6:.1f}M | {ms:.1f} | "
              f"{r['tokens_per_s'] / 1e3:.0f}k | {r['final_val_loss']:.3f} | {dval} | {sp} | {sv} | "
              f"{'-' if kept is None else f'{kept:.2f}'} | {'-' if attn is None else f'{attn:.1f}'} | {pred} | "
              f"{ideal} |")
    if base and a_dense:
        s = a_dense / base["iter_time_ms_median"]
        print(f"\nattention share of the dense flashring step (graph): {a_dense:.1f} / "
              f"{base['iter_time_ms_median']:.1f} ms = {100 * s:.0f}%; Amdahl's bound with free attention: "
              f"{1 / (1 - s):.2f}x")
    sdpa = graph_runs.get("sdpa")
    if sdpa and share.get("sdpa", {}).get(attn_key):
        s = share["sdpa"][attn_key] / sdpa["iter_time_ms_median"]
        print(f"attention share of the SDPA step (graph): {100 * s:.0f}%; bound {1 / (1 - s):.2f}x")
    if args.plots:
        kept_plot(args.logs / "graph" if (args.logs / "graph").is_dir() else args.logs, f"{args.plots}-kept.png")
        where = args.logs / "graph" if (args.logs / "graph").is_dir() else args.logs
        logs = sorted(str(x) for x in where.glob("*/log.jsonl") if not x.parent.name.endswith("-sdpa"))
        for x in ("tokens", "time"):
            subprocess.run([sys.executable, "-m", "flashring", "train", "plot", *logs, "--x", x, "--out",
                            f"{args.plots}-{x}.png"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

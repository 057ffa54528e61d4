"""``flashring train`` end to end on CPU: loss falls, resume, bad input, time limits, checkpoints, plots, progress."""
import os
import random

import pytest
import torch

SEED = int(os.environ.get("FLASHRING_SEED", random.randrange(2**31)))


def seed_msg(extra: str = "") -> str:
    return f"FLASHRING_SEED={SEED} {extra}"

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from flashring.train import loop, main
from flashring.train.config import TrainConfig
from flashring.train.progress import ProgressBar, fmt_duration

from conftest import read_log


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("attn", ["sdpa", "flash"])
def test_tiny_preset_loss_falls(attn, run_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args + ["--attn", attn, "--iters", "12", "--eval-every", "12", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and "tok/s" in printed
    log = read_log(out)
    meta = log[0]
    assert meta["type"] == "meta" and meta["config"]["attn"] == attn and meta["torch"] == torch.__version__
    assert {"device", "git_sha", "date", "n_params"} <= set(meta)
    train = [r["loss"] for r in log if r["type"] == "train"]
    assert len(train) == 12
    # an untrained byte model is near ln(256) = 5.55 nats; 12 steps at lr 3e-3 must take it well below
    assert abs(train[0] - math.log(256)) < 0.5, train
    assert np.mean(train[-3:]) < train[0] - 1.0, train
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["final_val_loss"] < train[0] - 1.0
    assert summary["tokens_per_s"] > 0 and summary["mfu"] is None  # no peak known for a CPU


# ----------------------------------------------------------------------------------------------- checkpoints
def test_resume_reproduces_next_steps(run_args, tmp_path):
    common = run_args + ["--iters", "5", "--lr-decay-iters", "5", "--eval-every", "100"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(common + ["--out", str(full)]) == 0
    assert main(common[:-6] + ["--iters", "3", "--lr-decay-iters", "5", "--eval-every", "100",
                                 "--out", str(part)]) == 0
    assert main(common + ["--out", str(part), "--resume", str(part)]) == 0
    loss = lambda out: {r["step"]: r["loss"] for r in read_log(out) if r["type"] == "train"}  # noqa: E731
    lf, lp = loss(full), loss(part)
    assert sorted(lp) == [1, 2, 3, 4, 5]  # the resumed run appended steps 4, 5 to the same log
    assert [lp[s] for s in (4, 5)] == [lf[s] for s in (4, 5)], (lf, lp)
    val = lambda out: [r["val_loss"] for r in read_log(out) if r["type"] == "val"][-1]  # noqa: E731
    assert val(full) == val(part)


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--data", "/nonexistent/corpus.txt"], "does not exist"),
    (["--attn", "ring", "--seqlen", "63"], "divisible by 2 * world size = 2"),
    (["--seqlen", "100000"], "too few"),
    (["--drop", "1.5", "--attn", "sdpa"], None),  # drop is only checked for qk-sparse: sdpa ignores it
    (["--n-head", "3"], "divisible by n_head"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--ckpt-every", "2"], "--ckpt-every needs --out"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
])
def test_bad_input_clear_errors(extra, message, run_args, capsys):
    code = main(run_args + ["--iters", "1"] + extra)
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
    else:
        assert code == 2 and message in err, err


def test_world_size_needs_ring(run_args, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(run_args + ["--attn", "flash"]) == 2
    assert "only --attn ring" in capsys.readouterr().err
    assert main(run_args + ["--attn", "ring", "--seqlen", "64"]) == 2  # 64 % (2 * 3) != 0
    assert "divisible by 2 * world size = 6" in capsys.readouterr().err


def test_resume_rejects_other_model(run_args, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(run_args + ["--iters", "1", "--out", str(out)]) == 0
    assert main(run_args + ["--iters", "2", "--resume", str(out), "--d-model", "32"]) == 2
    assert "d_model=64" in capsys.readouterr().err


def test_cli_unknown_attn_exit_code():
    env = {**os.environ, "PYTHONPATH": str(Path(loop.__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-m", "flashring", "train", "--attn", "bogus"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "invalid choice: 'bogus'" in r.stderr


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup=4, lr_decay_iters=14)
    assert [loop.lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert loop.lr_at(9, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert loop.lr_at(14, cfg) == loop.lr_at(100, cfg) == 0.1


def test_max_minutes_stops_all_work_cleanly(run_args, tmp_path):
    out = tmp_path / "t"
    assert main(run_args + ["--iters", "50", "--eval-every", "40", "--max-minutes", "1e-9", "--out", str(out)]) == 0
    log = read_log(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 1
    assert [r["step"] for r in log if r["type"] == "val"] == [1]  # validated where it stopped
    assert math.isfinite(summary["final_val_loss"])
    assert (out / "ckpt.pt").is_file()  # resumable from where it stopped


def test_max_minutes_saves_once(run_args, tmp_path, monkeypatch):
    saves = []
    monkeypatch.setattr(loop, "save_checkpoint", lambda run: saves.append(run.step))
    assert main(run_args + ["--iters", "50", "--ckpt-every", "1", "--max-minutes", "1e-9",
                              "--out", str(tmp_path / "s")]) == 0
    assert saves == [1]  # the periodic save at step 1 is the stop's save: not written twice


def test_no_save_writes_no_checkpoint(run_args, tmp_path):
    out = tmp_path / "n"
    assert main(run_args + ["--iters", "2", "--ckpt-every", "1", "--no-save", "--out", str(out)]) == 0
    assert (out / "summary.json").is_file() and not (out / "ckpt.pt").exists()


def test_out_of_memory_is_a_clear_error(run_args, monkeypatch, capsys):
    def oom(run):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(loop, "train_step", oom)
    assert main(run_args + ["--iters", "2"]) == 3
    err = capsys.readouterr().err
    assert "out of GPU memory" in err and "seqlen 64 x batch 4" in err and "--attn ring" in err


# ------------------------------------------------------------------------------------------------------ plot
def test_plot(run_args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p"
    assert main(run_args + ["--iters", "2", "--eval-every", "1", "--out", str(out)]) == 0
    with pytest.raises(SystemExit) as e:  # argparse error: missing log file
        main(["plot", str(out / "nope.jsonl")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert main(["plot", str(out / "log.jsonl"), "--out", str(tmp_path / "l.png")]) == 1
        assert "needs matplotlib" in capsys.readouterr().err
        return
    assert main(["plot", str(out / "log.jsonl"), "--out", str(tmp_path / "l.png")]) == 0
    assert (tmp_path / "l.png").stat().st_size > 1000
    assert main(["plot", str(out / "log.jsonl"), "--x", "time", "--out", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_training_seconds_sums_the_steps_times():
    from flashring.train.plot import training_seconds
    recs = [{"type": "meta"}, {"type": "train", "step": 1, "dt_ms": 250.0}, {"type": "val", "step": 1},
            {"type": "train", "step": 2, "dt_ms": 500.0}, {"type": "train", "step": 3, "dt_ms": "x"}]
    assert training_seconds(recs) == {1: 0.25, 2: 0.75}


# ------------------------------------------------------------------------------------------------- progress
def test_progress_bar_on_a_terminal_only(run_args, capsys):
    assert main(run_args + ["--iters", "3", "--progress", "on"]) == 0
    out = capsys.readouterr().out
    bars = [seg for seg in out.split("\r\x1b[K") if seg.startswith("[")]
    assert len(bars) == 3, out  # one redraw per step
    assert bars[-1].startswith("[" + "#" * ProgressBar.WIDTH + "] 3/3 | loss ") and "k tok/s" in bars[-1]
    assert "ETA 0:00" in bars[-1] and "MFU" not in bars[-1]  # CPU: no peak FLOP/s, so no MFU
    assert "done: 3 steps" in out.splitlines()[-1]  # the final line is not glued to a bar
    assert main(run_args + ["--iters", "2"]) == 0  # auto: pytest's captured stdout is not a terminal
    assert "\r" not in capsys.readouterr().out


def test_progress_bar_fields():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True
    stream = Tty()
    bar = ProgressBar(100, stream=stream)  # auto mode on a terminal
    assert bar.enabled
    for step in range(1, 21):  # 2 s steps, then the last 10 at 1 s: the mean is over the last 10
        bar.update(step, 2.5, 2.0 if step <= 10 else 1.0, 4096, 1e12, 4e12)
    last = stream.getvalue().split("\r\x1b[K")[-1]
    assert last == "[####....................] 20/100 | loss 2.5000 | 4.1k tok/s | MFU 25.0% | ETA 1:20", last
    bar.clear()
    assert stream.getvalue().endswith("\r\x1b[K") and not bar.shown
    assert not ProgressBar(5, stream=io.StringIO()).enabled  # auto, not a terminal
    assert fmt_duration(3725) == "1:02:05" and fmt_duration(float("nan")) == "?"


# ------------------------------------------------------------------ Pagliardini et al.'s recipe (issue 14 options)
def test_paper_recipe_options_train_and_log_kept_pairs(run_args, tmp_path):
    """--shared-qk, --positions learned, --lsh-unit-norm and --strict-causal train (hash-sparse), and every logged
    step records each layer's kept-pair fraction: hash buckets keep a fraction in (0, 1); a resumed run keeps the
    checkpoint's learned-position table and refuses a longer --seqlen."""
    out = tmp_path / "paper"
    args = run_args + ["--attn", "hash-sparse", "--buckets", "4", "--shared-qk", "--positions", "learned",
                       "--lsh-unit-norm", "--strict-causal", "--seqlen", "32", "--batch-size", "2", "--iters", "4",
                       "--log-every", "2", "--eval-every", "4", "--out", str(out)]
    assert main(args) == 0
    log = read_log(out)
    assert log[0]["config"]["shared_qk"] is True and log[0]["config"]["positions"] == "learned"
    logged = [r for r in log if r["type"] == "train" and "kept_pairs" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        assert len(r["kept_pairs"]) == 2 and all(0.0 < f < 1.0 for f in r["kept_pairs"]), r
    assert main(args[:-2] + ["--iters", "5", "--resume", str(out), "--out", str(out)]) == 0
    assert main(args[:-2] + ["--iters", "6", "--seqlen", "64", "--resume", str(out)]) == 2


def test_qk_sparse_logs_kept_pairs_near_keep_rate_squared(run_args, tmp_path):
    out = tmp_path / "qk"
    assert main(run_args + ["--attn", "qk-sparse", "--drop", "0.5", "--iters", "2", "--log-every", "1",
                            "--eval-every", "2", "--out", str(out)]) == 0
    kept = [f for r in read_log(out) if r["type"] == "train" for f in r["kept_pairs"]]
    # 4 x 64 tokens x 2 heads per layer: (1 - drop)^2 = 0.25 up to sampling noise
    assert len(kept) == 4 and all(0.15 < f < 0.35 for f in kept), kept


@pytest.mark.parametrize("extra, message", [
    (["--attn", "qk-sparse", "--strict-causal"], "--strict-causal applies to --attn hash-sparse, flash or sdpa"),
    (["--attn", "flash", "--lsh-unit-norm"], "--lsh-unit-norm applies to --attn hash-sparse"),
])
def test_recipe_flags_need_hash_sparse(extra, message, run_args, capsys):
    assert main(run_args + extra) == 2
    assert message in capsys.readouterr().err


def test_no_shared_qk_overrides_a_paper_preset():
    """The recipe's controls (separate q/k with RoPE) are the paper presets with --no-shared-qk --positions rope."""
    from flashring.train.config import from_argv
    assert from_argv(["--preset", "paper-8k"]).shared_qk is True
    cfg = from_argv(["--preset", "paper-8k", "--no-shared-qk", "--positions", "rope"])
    assert cfg.shared_qk is False and cfg.positions == "rope" and cfg.seqlen == 8192
    assert from_argv(["--shared-qk"]).shared_qk is True and from_argv([]).shared_qk is False


# ------------------------------------------------------------------------------------------- --cuda-graph
@pytest.mark.parametrize("extra, message", [
    (["--cuda-graph", "--checkpoint"], "--cuda-graph .* cannot be combined with --checkpoint"),
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device"),
])
def test_cuda_graph_refusals(extra, message, run_args, capsys):
    assert main(run_args + extra) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_trains_like_eager(run_args, tmp_path):
    """Replayed graphs give the eager run's losses (dense: no random draws; same weights and data), with and
    without gradient accumulation (the graph's static gradient buffers must be summed, not adopted), and the
    sparse modes train from graphs with fresh random draws and their kept-pair fractions logged."""
    base = run_args + ["--iters", "6", "--log-every", "1", "--eval-every", "6", "--device", "cuda"]
    for accum in ("1", "2"):
        losses = {}
        for name, extra in (("eager", []), ("graph", ["--cuda-graph"])):
            out = tmp_path / f"{name}-{accum}"
            assert main(base + ["--attn", "flash", "--grad-accum", accum, "--out", str(out)] + extra) == 0
            losses[name] = [r["loss"] for r in read_log(out) if r["type"] == "train"]
        assert np.allclose(losses["eager"], losses["graph"], rtol=2e-2), (accum, losses)
    for mode in (["--attn", "qk-sparse", "--drop", "0.5"], ["--attn", "hash-sparse", "--buckets", "4"]):
        out = tmp_path / mode[1]
        assert main(base + mode + ["--cuda-graph", "--grad-accum", "2", "--out", str(out)]) == 0
        recs = [r for r in read_log(out) if r["type"] == "train"]
        assert all(math.isfinite(r["loss"]) for r in recs) and recs[-1]["loss"] < recs[0]["loss"]
        kept = [r["kept_pairs"] for r in recs]
        assert all(0.0 < f < 1.0 for k in kept for f in k) and len({tuple(k) for k in kept}) > 1  # fresh draws

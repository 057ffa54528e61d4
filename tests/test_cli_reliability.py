"""The command lines under bad input: every failure is one line on stderr naming the flag or file, exit code 2 for
bad arguments or input, and nothing already written is lost (checkpoints, logs, other runs' files)."""
import fcntl
import hashlib
import json
import os
import pathlib
import random
import shutil

import numpy as np
import pytest
import torch

from flashring.bench import dense, ring, sparse, tune
from flashring.bench import harness as H
from flashring.train import loop, main, plot
from flashring.train.config import from_argv
from flashring.train.data import file_corpus

SEED = int(os.environ.get("FLASHRING_SEED", random.randrange(2**31)))
HUGE = str(2**40)   # tokens: its inputs (512 TiB) exceed any allocator at once, on CPU and on a GPU alike


def error_line(err: str, prog: str = "flashring train") -> str:
    """The one error line of a failed command: exactly one, no traceback."""
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_checksum(path: pathlib.Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loop.checksum_path(path).write_text(f"{digest}  {path.name}\n")


@pytest.fixture(scope="module")
def trained(corpus_root, tmp_path_factory):
    """One tiny run (2 steps, checkpoint every step) whose directory the resume tests copy."""
    from conftest import TRAIN_SMALL
    root = tmp_path_factory.mktemp("trained")
    args = TRAIN_SMALL + ["--corpus-root", str(corpus_root), "--cache-dir", str(root / "cache"), "--iters", "2",
                          "--eval-every", "100", "--ckpt-every", "1"]
    assert main(args + ["--out", str(root / "run")]) == 0
    return root / "run"


def copy_run(trained, tmp_path) -> pathlib.Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# ------------------------------------------------------------------------------------------- 1. damaged checkpoints
def _truncated(ckpt):
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])


def _flipped(ckpt):
    data = bytearray(ckpt.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 16] = bytes(b ^ 0xFF for b in data[mid: mid + 16])
    ckpt.write_bytes(bytes(data))


def _empty(ckpt):
    ckpt.write_bytes(b"")
    write_checksum(ckpt)


def _text(ckpt):
    ckpt.write_text("this is not a checkpoint\n" * 10)
    write_checksum(ckpt)


def _foreign_dict(ckpt):
    torch.save({"weights": torch.zeros(3), "step": 1}, ckpt)
    write_checksum(ckpt)


def _random_npy(ckpt):
    with open(ckpt, "wb") as f:
        np.save(f, np.random.default_rng(SEED).random(100))
    write_checksum(ckpt)


def _no_checksum(ckpt):
    loop.checksum_path(ckpt).unlink()


@pytest.mark.parametrize("damage, message", [
    (_truncated, "do not match ckpt.pt.sha256"),
    (_flipped, "do not match ckpt.pt.sha256"),
    (_empty, "not a checkpoint torch can load"),
    (_text, "not a checkpoint torch can load"),
    (_foreign_dict, "not a flashring train checkpoint (it has no model, optimizer"),
    (_random_npy, "not a checkpoint torch can load"),
    (_no_checksum, "no checksum file ckpt.pt.sha256"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else "")
def test_resume_refuses_damaged_checkpoint(damage, message, trained, run_args, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    damage(out / "ckpt.pt")
    log_before = (out / "log.jsonl").read_bytes()
    assert main(run_args + ["--iters", "4", "--out", str(out), "--resume", str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--resume {out / 'ckpt.pt'}" in line and message in line, line
    assert (out / "log.jsonl").read_bytes() == log_before           # the refused run wrote nothing


def test_checkpoint_survives_a_kill_at_every_step_of_a_save(run_args, tmp_path, monkeypatch):
    """A kill (SIGKILL) anywhere in a save leaves a checkpoint that verifies: the previous one, or the new one."""
    out = tmp_path / "k"
    cfg = from_argv(run_args + ["--iters", "3", "--out", str(out)])
    out.mkdir()
    run = loop.Run(cfg, loop.Env(cfg))
    run.step = 1
    loop.save_checkpoint(run)

    class Killed(BaseException):
        pass

    real_replace, real_save = pathlib.Path.replace, torch.save
    for kill_at, survivor in [("save", 1), (1, 1), (2, 1), (3, 2)]:
        calls = []

        def replace(self, target, kill_at=kill_at, calls=calls):
            calls.append(self)
            if len(calls) == kill_at:
                raise Killed
            return real_replace(self, target)

        def save(obj, f, kill_at=kill_at):
            if kill_at == "save":
                f.write(b"PK\x03\x04 half a checkpoint")
                raise Killed
            return real_save(obj, f)

        monkeypatch.setattr(pathlib.Path, "replace", replace)
        monkeypatch.setattr(torch, "save", save)
        run.step = 2
        with pytest.raises(Killed):
            loop.save_checkpoint(run)
        monkeypatch.undo()
        assert loop.load_checkpoint(from_argv(["--resume", str(out)]))["step"] == survivor, kill_at
        run.step = 1
        loop.save_checkpoint(run)                    # back to the step-1 checkpoint for the next kill point

    # a run killed mid-record left half a line: the resumed run's records start on a line of their own
    with open(out / "log.jsonl", "a") as f:
        f.write('{"type": "train", "st')
    assert main(run_args + ["--iters", "3", "--out", str(out), "--resume", str(out)]) == 0
    records, bad = plot.read_log(out / "log.jsonl")
    assert len(bad) == 1 and [r["step"] for r in records if r["type"] == "train"] == [2, 3]


# ------------------------------------------------------------------------- 2. resume with other settings or vocabulary
def test_resume_says_what_the_checkpoint_overrides(trained, run_args, capsys):
    no_preset = run_args[2:]                       # run_args starts with --preset tiny
    assert run_args[:2] == ["--preset", "tiny"]
    assert main(no_preset + ["--iters", "2", "--resume", str(trained)]) == 0
    printed = capsys.readouterr().out
    assert (f"--resume {trained / 'ckpt.pt'}: the checkpoint sets the model: n_layer=2 (not 6), n_head=2 (not 6), "
            "d_model=64 (not 384)") in printed, printed
    assert "nothing to train" in printed


def test_resume_refuses_another_preset_or_vocabulary(trained, run_args, tmp_path, capsys):
    no_preset = run_args[2:]
    assert main(no_preset + ["--preset", "gpt-8k", "--iters", "4", "--resume", str(trained)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "n_layer=2" in line and "n_layer=8 (--preset gpt-8k)" in line and str(trained) in line, line
    assert main(run_args + ["--vocab-size", "512", "--iters", "4", "--resume", str(trained)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "vocab_size=256" in line and "vocab_size=512 (--vocab-size)" in line, line
    tokens = tmp_path / "ids.npy"
    np.save(tokens, np.random.default_rng(SEED).integers(0, 1000, 20_000).astype(np.uint16))
    assert main(no_preset + ["--preset", "tiny", "--data", str(tokens), "--iters", "4", "--resume", str(trained)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--data {tokens} holds token id" in line and "the vocabulary of --resume" in line, line


# ------------------------------------------------------------------------------------- 3. token ids outside the vocab
def test_token_ids_beyond_vocab_size(run_args, tmp_path, capsys):
    tokens = tmp_path / "ids.bin"
    ids = np.random.default_rng(SEED).integers(0, 500, 20_000).astype(np.uint16)
    ids[123] = 700
    ids.tofile(tokens)
    assert main(run_args + ["--data", str(tokens), "--vocab-size", "512", "--iters", "1"]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--data {tokens} holds token id 700" in line and "--vocab-size is 512" in line, line
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(256)) * 40)
    corpus = file_corpus(text, vocab_size=256)
    corpus.check_vocab(256, "--vocab-size")
    assert corpus.max_id is None                   # bytes and a vocabulary of 256: nothing to read
    with pytest.raises(ValueError, match="holds token id 255, but --vocab-size is 200"):
        corpus.check_vocab(200, "--vocab-size")


# --------------------------------------------------------------------------------------------- 4. unusable --out
def test_out_that_cannot_be_used(run_args, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("keep me\n")
    for out, message in [(a_file, "exists and is not a directory"), (a_file / "sub", "cannot create the directory")]:
        assert main(run_args + ["--iters", "1", "--out", str(out)]) == 2
        line = error_line(capsys.readouterr().err)
        assert f"--out {out}" in line and message in line, line
    assert a_file.read_text() == "keep me\n"
    # The tests run as root, which may write anywhere: os.access is made to say "not writable" for this one path.
    locked = tmp_path / "ro"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if pathlib.Path(p) == locked
                        else real_access(p, mode, **kw))
    assert main(run_args + ["--iters", "1", "--out", str(locked)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--out {locked}: the directory is not writable" in line, line


# ---------------------------------------------------------------------------------------- 5. two writers, one --out
def test_second_writer_of_an_out_directory_is_refused(run_args, tmp_path, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "log.jsonl").write_text('{"type": "meta"}\n')
    with open(out / loop.LOCK_NAME, "a+") as held:        # the first run, holding its lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        assert main(run_args + ["--iters", "1", "--out", str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--out {out} is in use by another flashring train run (pid 4242)" in line, line
    assert (out / "log.jsonl").read_text() == '{"type": "meta"}\n'


# -------------------------------------------------------------------------------------------------- 6. bad --data
def _npy_garbage(path):
    path.write_bytes(np.random.default_rng(SEED).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _npy_truncated(path):
    np.save(path, np.arange(5000, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:2000])


@pytest.mark.parametrize("name, write, message", [
    ("empty.txt", lambda p: p.write_bytes(b""), "the file is empty"),
    ("empty.npy", lambda p: p.write_bytes(b""), "the file is empty"),
    ("garbage.npy", _npy_garbage, "not a readable .npy token array"),
    ("text.npy", lambda p: p.write_text("hello\n" * 100), "not a readable .npy token array"),
    ("truncated.npy", _npy_truncated, "not a readable .npy token array"),
    ("floats.npy", lambda p: np.save(p, np.zeros(5000)), "expected a 1-D uint8 or uint16 token array"),
    ("none.npy", lambda p: np.save(p, np.zeros(0, dtype=np.uint16)), "holds no tokens"),
])
def test_bad_data_file(name, write, message, run_args, tmp_path, capsys):
    path = tmp_path / name
    write(path)
    assert main(run_args + ["--iters", "1", "--data", str(path)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--data {path}" in line and message in line, line


# --------------------------------------------------------------------------------------------- 7. plot, broken line
def test_plot_skips_and_reports_a_broken_line(tmp_path, capsys):
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    records = [{"type": "meta", "config": {"attn": "flash", "seqlen": 64}}, {"type": "train", "step": 1, "loss": 5.0},
               {"type": "train", "step": 2, "loss": 4.0}, {"type": "val", "step": 2, "val_loss": 4.1},
               {"type": "train", "step": 3, "loss": "not a number"}]
    lines = [json.dumps(r) for r in records]
    lines.insert(3, '{"type": "train", "step": 3, "lo')            # a run killed mid-write
    log.write_text("\n".join(lines) + "\n")
    got, bad = plot.read_log(log)
    assert bad == [4] and len(got) == len(records)
    assert plot.points(got, "train", "loss", 1) == [(1, 5.0), (2, 4.0)]   # the non-number left out
    assert main(["plot", str(log), "--out", str(tmp_path / "loss.png")]) == 0
    assert f"{log}: skipped 1 unreadable line(s): [4]" in capsys.readouterr().err
    assert (tmp_path / "loss.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------- 8. bench flags, OOM
@pytest.mark.parametrize("suite, argv, flag", [
    (ring, ["--cpu", "--seqlens", "-8"], "--seqlens: -8 is not a positive integer"),
    (ring, ["--cpu", "--headdim", "0"], "--headdim: 0 is not a positive integer"),
    (ring, ["--cpu", "--headdim", "512"], "--headdim: headdim 512 > 256"),
    (ring, ["--cpu", "--nproc", "0"], "--nproc: 0 is not a positive integer"),
    (ring, ["--cpu", "--nproc", "two"], "--nproc: 'two' is not an integer"),
    (ring, ["--cpu", "--probe-seconds", "nan"], "--probe-seconds must be > 0"),
    (ring, ["--device", "cpu", "--seqlens", "256,6"], "--seqlens 6: every length must be divisible by 4"),
    (dense, ["--seqlens", "1.5k"], "--seqlens: '1.5' is not an integer"),
    (dense, ["--headdims", "0"], "--headdims: 0 is not a positive integer"),
    (dense, ["--batch", "0"], "--batch: 0 is not a positive integer"),
])
def test_bench_bad_flags_exit_2(suite, argv, flag, tmp_path, capsys):
    assert suite.main(argv + ["--out", str(tmp_path)]) == 2
    line = error_line(capsys.readouterr().err, f"flashring bench {suite.__name__.rsplit('.', 1)[1]}")
    assert flag in line, line
    assert not list(tmp_path.glob("*.jsonl"))


def test_bench_dense_out_of_memory_shape_is_skipped(tmp_path, capsys):
    rc = dense.main(["--seqlens", f"64,{HUGE}", "--causal", "no", "--modes", "fwd", "--providers", "naive,math",
                     "--batch", "1", "--nheads", "2", "--headdims", "64", "--dtype", "fp32",
                     "--out", str(tmp_path), "--no-plot", "--seed", str(SEED)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()[1:]]
    by_size = {(r["config"]["seqlen_q"], r["provider"]): r for r in rows}
    assert len(rows) == 4 and all(by_size[(64, p)]["check"] == "PASS" for p in ("naive", "sdpa-math"))
    assert all(by_size[(2**40, p)]["error"] == "OOM allocating inputs" for p in ("naive", "sdpa-math"))
    assert f"S={HUGE}" in captured.out and "OOM allocating inputs" in captured.out      # the table says which
    assert "out of memory on" in captured.err and f"B=1 S={HUGE} H=2 D=64 full fp32" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("suite, argv", [
    (sparse, ["--patterns", "qk", "--qk-drop", "0.5", "--modes", "fwd"]),
    (tune, ["--headdims", "16", "--causal", "yes", "--passes", "fwd"]),
])
def test_bench_sparse_and_tune_skip_a_shape_that_does_not_fit(suite, argv, tmp_path, capsys):
    assert suite.main(argv + ["--seqlens", HUGE, "--out", str(tmp_path), "--no-plot"]) == 0
    rows = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()[1:]]
    assert rows and all(r["error"] == "OOM allocating inputs" and r["ms"] is None for r in rows), rows
    assert f"S={HUGE}" in capsys.readouterr().err


def test_is_oom_knows_the_cpu_allocator():
    with pytest.raises(RuntimeError) as e:
        torch.empty(2**50, dtype=torch.uint8)
    assert H.is_oom(e.value) and H.reason(e.value) == "OOM"
    assert H.is_oom(MemoryError()) and not H.is_oom(RuntimeError("shape mismatch"))

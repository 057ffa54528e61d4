"""Training data: the stdlib corpus split, user token files, the window sampler."""
import os
import random
import shutil

import pytest
import torch

SEED = int(os.environ.get("FLASHRING_SEED", random.randrange(2**31)))


def seed_msg(extra: str = "") -> str:
    return f"FLASHRING_SEED={SEED} {extra}"

import numpy as np

from flashring.train.data import FILE_SEP, WindowSampler, file_corpus, stdlib_corpus


def test_stdlib_split_deterministic_and_disjoint(corpus_root, tmp_path):
    a = stdlib_corpus(corpus_root, tmp_path / "c1", val_every=4)
    b = stdlib_corpus(corpus_root, tmp_path / "c2", val_every=4)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    files = sorted(p.relative_to(corpus_root).as_posix() for p in corpus_root.rglob("*.py"))
    assert a.val_files == files[3::4] and not set(a.train_files) & set(a.val_files)
    assert sorted(a.train_files + a.val_files) == files
    expect_val = b"".join((corpus_root / f).read_bytes() + FILE_SEP for f in a.val_files)
    assert a.val.tobytes() == expect_val and a.vocab_size == 256
    # second call reads the cache rather than rebuilding it
    meta = next((tmp_path / "c1").glob("*/meta.json"))
    mtime = meta.stat().st_mtime_ns
    c = stdlib_corpus(corpus_root, tmp_path / "c1", val_every=4)
    assert meta.stat().st_mtime_ns == mtime and np.array_equal(c.train, a.train)


def test_file_corpus_kinds(tmp_path):
    rng = np.random.default_rng(SEED)
    text = tmp_path / "t.txt"
    text.write_bytes(rng.integers(32, 127, 5000, dtype=np.uint8).tobytes())
    c = file_corpus(text)
    assert len(c.train) == 4500 and len(c.val) == 500 and c.vocab_size == 256
    tok = rng.integers(1, 1000, 3000).astype(np.uint16)
    np.save(tmp_path / "t.npy", tok)
    tok.tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        c = file_corpus(tmp_path / name)
        assert np.array_equal(np.concatenate([c.train, c.val]), tok)
        assert c.vocab_size == -(-(int(tok.max()) + 1) // 64) * 64
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="odd number of bytes"):
        file_corpus(tmp_path / "odd.bin")
    with pytest.raises(ValueError, match="does not exist"):
        file_corpus(tmp_path / "missing.txt")
    s1, s2 = WindowSampler(tok, 3, 16, SEED), WindowSampler(tok, 3, 16, SEED)
    x1, y1 = s1.next()
    x2, y2 = s2.next()
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1]) and x1.shape == (3, 16)


# ------------------------------------------------------------------------------------------ English BPE corpus
def test_english_corpus_builds_once_and_round_trips(tmp_path):
    """Docstring prose (code-like and short docstrings dropped) plus HTML docs with the markup stripped, split by
    file, BPE-tokenised and cached; the ids decode back to the text."""
    import json
    from tokenizers import Tokenizer
    from flashring.train.english import english_corpus
    src, docs = tmp_path / "src", tmp_path / "docs"
    src.mkdir()
    docs.mkdir()
    words = "the quick brown fox jumps over a lazy dog while attention reads every key once".split()
    for i in range(30):
        prose = " ".join(words[(i + j) % len(words)] for j in range(20))
        (src / f"m{i:02d}.py").write_text(f'"""Module {i}: {prose}."""\n\ndef f():\n    """x = [1, 2]; y = {{3: 4}}"""\n')
    (docs / "page.html").write_text("<html><body><p>Kernel documentation says that a spinlock must never be held "
                                    "while sleeping in any context.</p><pre>int x = 1;</pre></body></html>")
    (docs / "_sources").mkdir()          # Sphinx's copy of the page source: skipped, not counted twice
    (docs / "_sources" / "page.rst.txt").write_text("A spinlock must never be held while sleeping in any context, "
                                                   "says the kernel documentation.\n")
    corpus = english_corpus([src], [docs], tmp_path / "cache", val_every=10, bpe_vocab=300, workers=1)
    assert corpus.vocab_size == 300 and corpus.train.dtype == np.uint16 and len(corpus.val) > 0
    cache = next((tmp_path / "cache").glob("english-*"))
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["files"] == 31 and meta["files_with_text"] == 31 and meta["documents"] == 31
    text = Tokenizer.from_file(str(cache / "tokenizer.json")).decode(np.asarray(corpus.train).tolist(),
                                                                       skip_special_tokens=True)
    assert "Module 0: the quick brown fox" in text and "spinlock must never be held" in text
    assert "x = [1, 2]" not in text and "int x = 1" not in text
    stamp = (cache / "train.bin").stat().st_mtime_ns
    english_corpus([src], [docs], tmp_path / "cache", val_every=10, bpe_vocab=300)
    assert (cache / "train.bin").stat().st_mtime_ns == stamp           # cached: not rebuilt


def test_english_corpus_trains(tmp_path, run_args):
    from flashring.train import main
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"m{i:02d}.py").write_text('"""' + " ".join(f"word{(i * 7 + j) % 50} is here" for j in range(300))
                                          + '"""\n')
    args = [a for a in run_args if a not in ()]
    args[args.index("--corpus-root") + 1] = str(src)
    assert main(args + ["--corpus", "english", "--bpe-vocab", "512", "--iters", "2", "--eval-every", "2"]) == 0
    assert main(args + ["--bpe-vocab", "512"]) == 2                  # --bpe-vocab without --corpus english
    # the built corpus, copied elsewhere, trains as --data DIR on the same tokens (how the GPU runs get it);
    # a paper-* preset's own corpus (english) yields to --data
    built = next((tmp_path / "cache").glob("english-*"))
    copy = tmp_path / "copied-corpus"
    shutil.copytree(built, copy)
    rest = [a for i, a in enumerate(args) if a != "--corpus-root" and args[i - 1] != "--corpus-root"]
    assert main(rest + ["--data", str(copy), "--iters", "2", "--eval-every", "2", "--shared-qk",
                        "--positions", "learned"]) == 0
    from flashring.train.english import corpus_dir
    a, b = corpus_dir(built), corpus_dir(copy)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val) and a.vocab_size == b.vocab_size


def test_corpus_dir_refuses_incomplete_or_truncated_copies(tmp_path, run_args):
    import json
    from flashring.train import main
    from flashring.train.english import corpus_dir
    d = tmp_path / "corpus"
    d.mkdir()
    with pytest.raises(ValueError, match="--data .*missing meta.json, train.bin, val.bin"):
        corpus_dir(d)
    np.arange(300, dtype=np.uint16).tofile(d / "train.bin")
    np.arange(40, dtype=np.uint16).tofile(d / "val.bin")
    (d / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="--data .*unreadable meta.json"):
        corpus_dir(d)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 512, "train_tokens": 300, "val_tokens": 41}))
    with pytest.raises(ValueError, match="--data .*val.bin holds 40 tokens, meta.json says 41"):
        corpus_dir(d)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 512, "train_tokens": 300, "val_tokens": 40}))
    c = corpus_dir(d)
    assert c.vocab_size == 512 and len(c.train) == 300 and int(c.val[-1]) == 39
    (d / "val.bin").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="--data .*val.bin must hold uint16 tokens"):
        corpus_dir(d)
    args = [a for i, a in enumerate(run_args) if a != "--corpus-root" and run_args[i - 1] != "--corpus-root"]
    assert main(args + ["--data", str(d)]) == 2                        # one line naming --data, exit 2
    assert main(args + ["--data", str(tmp_path), "--data-dtype", "uint16"]) == 2


def test_english_corpus_refuses_an_empty_split(tmp_path):
    """Validation files whose prose the training files already hold leave an empty split: a clear error, and no
    cache written that would fail the same way forever."""
    from flashring.train.english import english_corpus
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"m{i:02d}.py").write_text('"""The same sentence in every file of this corpus, word for word."""\n')
    with pytest.raises(ValueError, match="validation files"):
        english_corpus([src], [], tmp_path / "cache", val_every=10, bpe_vocab=300, workers=1)
    assert not list((tmp_path / "cache").glob("english-*/meta.json"))
    with pytest.raises(ValueError, match="val_every|source files"):
        english_corpus([src], [], tmp_path / "cache", val_every=50, bpe_vocab=300, workers=1)

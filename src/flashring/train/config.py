"""The training run's settings: one typed dataclass, presets as data, and the command line that fills them.

Precedence: dataclass defaults < ``--preset`` < options given on the command line (recorded in ``explicit``, so
``--resume`` can tell a deliberate change of model from a preset default).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

ATTN_MODES = ("sdpa", "flash", "qk-sparse", "hash-sparse", "ring")
MODEL_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model", "ffn_mult", "rope_base", "shared_qk", "positions")
# What a checkpoint written before a model field existed trained with (loaded checkpoints are filled with these).
ARCH_DEFAULTS = {"shared_qk": False, "positions": "rope", "n_positions": 0}
POSITIONS = ("rope", "learned")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashring"


@dataclass
class TrainConfig:
    # model
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    ffn_mult: int = 4
    rope_base: float = 10000.0
    vocab_size: Optional[int] = None          # default: the corpus's
    shared_qk: bool = False                   # k = normalize(q) per head (the projection makes q and v only)
    positions: str = "rope"                   # rope, or learned absolute embeddings (one per position < seqlen)
    # attention (model.py): --attn, and the sparse modes' settings
    attn: str = "flash"
    drop: float = 0.5                         # qk-sparse: probability of dropping a query / key, per head
    buckets: int = 8                          # hash-sparse: LSH buckets (even)
    lsh_unit_norm: bool = False               # hash-sparse: unit-length LSH projection directions
    strict_causal: bool = False               # j < i: no token attends to itself (hash-sparse: inside a bucket)
    # memory: tokens per feed-forward / cross-entropy chunk (0 = unchunked); whole-block recomputation
    ffn_chunk: int = 4096
    ce_chunk: int = 4096
    checkpoint: bool = False
    cuda_graph: bool = False                  # each micro-batch's forward + backward replayed from a CUDA graph
    # optimisation
    seqlen: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    iters: int = 200
    lr: float = 1e-3
    min_lr: Optional[float] = None            # default lr / 10
    warmup: int = 20
    lr_decay_iters: Optional[int] = None      # default iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    dtype: str = "auto"                       # autocast: bf16 on CUDA, fp32 on CPU
    device: Optional[str] = None
    # data
    data: Optional[str] = None
    data_dtype: Optional[str] = None
    corpus: str = "python"                    # python (bytes of the stdlib's .py files) or english (BPE prose)
    corpus_root: Optional[str] = None
    text_root: Optional[str] = None           # english: comma-separated dirs of HTML / text docs to add
    bpe_vocab: int = 8192
    val_every: int = 20
    cache_dir: str = str(DEFAULT_CACHE)
    # logging and checkpoints
    eval_every: int = 100
    eval_iters: int = 4
    log_every: int = 10
    progress: str = "auto"
    out: Optional[str] = None
    ckpt_every: int = 0
    no_save: bool = False
    max_minutes: float = 0.0
    resume: Optional[str] = None
    peak_tflops: Optional[float] = None
    preset: Optional[str] = None
    explicit: Tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.iters

    def validate(self, world: int) -> None:
        """ValueError naming the flag, before anything is built."""
        for key in ("seqlen", "batch_size", "grad_accum", "iters", "eval_every", "eval_iters", "log_every",
                    "lr_decay_iters", "val_every", "n_layer", "n_head", "d_model", "ffn_mult"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{flag(key)} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup", "ckpt_every", "weight_decay", "grad_clip", "min_lr", "max_minutes", "ffn_chunk",
                    "ce_chunk"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{flag(key)} must be >= 0, got {getattr(self, key)}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"--vocab-size must be >= 1, got {self.vocab_size}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"--peak-tflops must be > 0, got {self.peak_tflops}")
        if self.ckpt_every and not self.out:
            raise ValueError("--ckpt-every needs --out (the directory to write ckpt.pt into)")
        if self.attn == "qk-sparse" and not 0.0 <= self.drop < 1.0:
            raise ValueError(f"--drop must be in [0, 1) for --attn qk-sparse, got {self.drop}")
        if self.attn == "hash-sparse" and (self.buckets < 2 or self.buckets % 2):
            # angular LSH takes the argmax over [xR, -xR], so a bucket count is 2 x (rotated dims)
            raise ValueError(f"--buckets must be an even number >= 2 for --attn hash-sparse, got {self.buckets}")
        if self.corpus not in ("python", "english"):
            raise ValueError(f"--corpus must be python or english, got {self.corpus!r}")
        if self.corpus == "english" and self.data and "corpus" in self.explicit:   # a preset's corpus yields
            raise ValueError("--corpus english builds its own data; it cannot be combined with --data")
        if self.corpus != "english" and (self.text_root or "bpe_vocab" in self.explicit):
            raise ValueError(f"--{'text-root' if self.text_root else 'bpe-vocab'} applies to --corpus english only")
        if self.positions not in POSITIONS:
            raise ValueError(f"--positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.lsh_unit_norm and self.attn != "hash-sparse":
            raise ValueError(f"--lsh-unit-norm applies to --attn hash-sparse only (got --attn {self.attn})")
        if self.strict_causal and self.attn not in ("hash-sparse", "flash", "sdpa"):
            raise ValueError(f"--strict-causal applies to --attn hash-sparse, flash or sdpa (got --attn {self.attn})")
        if self.cuda_graph and (self.checkpoint or self.attn == "ring" or world > 1):
            why = "--checkpoint" if self.checkpoint else ("--attn ring" if self.attn == "ring" else
                                                          f"WORLD_SIZE={world}")
            raise ValueError(f"--cuda-graph captures one process's whole micro-batch; it cannot be combined with "
                             f"{why}")
        if world > 1 and self.attn != "ring":
            raise ValueError(f"WORLD_SIZE={world}, but only --attn ring splits work across processes (each rank "
                             f"holds a shard of the sequence); run --attn {self.attn} as a single process")
        if self.attn == "ring" and self.seqlen % (2 * world):
            raise ValueError(f"--attn ring (zigzag layout) needs seqlen divisible by 2 * world size = {2 * world}; "
                             f"got seqlen {self.seqlen}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["explicit"] = list(self.explicit)
        return d


def flag(name: str) -> str:
    return name.replace("_", "-")


# Presets. Parameter counts (tied embeddings, vocab 256): tiny 0.115M, gpt-8k 25.3M, gpt-16k 85.2M (gpt-32k: the
# gpt-16k model at twice the length). Tokens per step: tiny 1k, the GPU presets 32k.
PRESETS: Dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, d_model=64, seqlen=128, batch_size=8, iters=40, lr=3e-3, warmup=4,
                 eval_every=20, eval_iters=2, log_every=5, ffn_chunk=256, ce_chunk=256),
    "gpt-8k": dict(n_layer=8, n_head=8, d_model=512, seqlen=8192, batch_size=4, iters=1000, lr=1e-3, warmup=100,
                   eval_every=200, eval_iters=8, log_every=10, ffn_chunk=8192, ce_chunk=8192),
    "gpt-16k": dict(n_layer=12, n_head=12, d_model=768, seqlen=16384, batch_size=2, iters=1000, lr=6e-4,
                    warmup=100, eval_every=200, eval_iters=8, log_every=10, ffn_chunk=8192, ce_chunk=8192),
    "gpt-32k": dict(n_layer=12, n_head=12, d_model=768, seqlen=32768, batch_size=1, iters=1000, lr=6e-4,
                    warmup=100, eval_every=200, eval_iters=8, log_every=10, ffn_chunk=8192, ce_chunk=8192),
    # Pagliardini et al.'s language-model recipe (issue 14): 12 x 768, 12 heads x 64, shared-QK, learned absolute
    # positions, English BPE; lr 1e-3 -> 2e-4 cosine, 2% warm-up, weight decay 0.1, betas (0.9, 0.95), no
    # gradient clipping. 32k tokens per step: 1000 steps = 33M tokens. Arms: --attn flash|sdpa|qk-sparse|
    # hash-sparse (add --lsh-unit-norm --strict-causal for their hashing).
    "paper-8k": dict(n_layer=12, n_head=12, d_model=768, seqlen=8192, batch_size=4, iters=1000, lr=1e-3, min_lr=2e-4,
                     warmup=20, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=0.0, shared_qk=True,
                     positions="learned", corpus="english", eval_every=100, eval_iters=8, log_every=10,
                     ffn_chunk=8192, ce_chunk=8192),
    "paper-16k": dict(n_layer=12, n_head=12, d_model=768, seqlen=16384, batch_size=2, iters=1000, lr=1e-3,
                      min_lr=2e-4, warmup=20, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=0.0, shared_qk=True,
                      positions="learned", corpus="english", eval_every=100, eval_iters=8, log_every=10,
                      ffn_chunk=8192, ce_chunk=8192),
    # The ring experiment's model (3.78B parameters, 20 heads x 128), sized so that one sequence of its length
    # does not fit one 141 GB H200 (BENCHMARKS.md: one H200 fits 32,768 tokens at 132.6 GiB peak, 49 GiB of it
    # weights and AdamW state + 2.6 MiB per token, and runs out of memory at 40,960; the ring on 2 H200s holds
    # 40,960 in 101.5 GiB per GPU at 3.6 s per step).
    "gpt3b-ring": dict(n_layer=48, n_head=20, d_model=2560, seqlen=40960, batch_size=1, iters=300, lr=3e-4,
                       warmup=30, eval_every=50, eval_iters=2, log_every=10, ffn_chunk=8192, ce_chunk=8192),
}


def build_parser() -> argparse.ArgumentParser:
    """Every TrainConfig field as an option (default None = not given), grouped as the dataclass is."""
    p = argparse.ArgumentParser(prog="flashring train", description="train the long-context GPT example with a "
                                "choice of attention", epilog="`flashring train plot LOGS... --out loss.png` plots "
                                "loss curves. Exit codes: 0 done, 2 bad arguments or input, 3 out of GPU memory.")
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="model/run preset; explicit options override it")
    a("--attn", choices=ATTN_MODES, help="attention kernel (default flash)")
    a("--drop", type=float, help="qk-sparse: probability of dropping each query / key, per head (default 0.5)")
    a("--buckets", type=int, help="hash-sparse: number of LSH buckets, even (default 8)")
    a("--lsh-unit-norm", action="store_const", const=True,
      help="hash-sparse: unit-length random projection directions (Pagliardini et al.'s code)")
    a("--strict-causal", action="store_const", const=True,
      help="a query sees earlier keys only (j < i; hash-sparse: of its bucket), never itself; the first token "
           "outputs 0 (flash, sdpa, hash-sparse). With --shared-qk a token's own key always scores highest")
    g = p.add_argument_group("model (default: preset, else a 6-layer 384-wide model)")
    for name, typ in (("n_layer", int), ("n_head", int), ("d_model", int), ("ffn_mult", int), ("rope_base", float)):
        g.add_argument(f"--{flag(name)}", type=typ)
    g.add_argument("--shared-qk", action="store_const", const=True,
                   help="keys are the normalised queries, per head (k = normalize(q)); hash-sparse then hashes q")
    g.add_argument("--no-shared-qk", dest="shared_qk", action="store_const", const=False,
                   help="separate q and k projections (the default; overrides a paper-* preset)")
    g.add_argument("--positions", choices=POSITIONS, help="rope (default) or learned absolute position embeddings")
    g = p.add_argument_group("memory")
    g.add_argument("--ffn-chunk", type=int, help="tokens per feed-forward chunk, 0 = unchunked")
    g.add_argument("--ce-chunk", type=int, help="tokens per cross-entropy chunk, 0 = unchunked")
    g.add_argument("--checkpoint", action="store_const", const=True, help="recompute each block in the backward")
    g.add_argument("--cuda-graph", action="store_const", const=True,
                   help="capture each micro-batch's forward + backward once and replay it as a CUDA graph: the host "
                        "no longer launches every kernel of every step (the sparse front ends' per-call cost); one "
                        "CUDA process, not with --checkpoint or --attn ring")
    g = p.add_argument_group("optimisation")
    for name, typ, help_ in [("seqlen", int, "tokens per sequence"), ("batch_size", int, "sequences per step"),
                             ("grad_accum", int, "micro-batches per step"), ("iters", int, "optimizer steps"),
                             ("lr", float, "peak learning rate"), ("min_lr", float, "final lr (default lr/10)"),
                             ("warmup", int, "linear warm-up steps"),
                             ("lr_decay_iters", int, "cosine decay length (default: --iters)"),
                             ("weight_decay", float, None), ("beta1", float, None), ("beta2", float, None),
                             ("grad_clip", float, "max gradient norm, 0 = off"), ("seed", int, "default 1234")]:
        g.add_argument(f"--{flag(name)}", type=typ, help=help_)
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", help="default: cuda if available (cuda:LOCAL_RANK under torchrun)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="token file: .npy (uint8/uint16), .bin (see --data-dtype) or text (bytes), or a "
                                  "corpus directory that --corpus english built (meta.json, train.bin, val.bin; "
                                  "copy it to train elsewhere on the same tokens); default: the Python stdlib's "
                                  ".py sources")
    g.add_argument("--data-dtype", choices=("uint8", "uint16"), help=".bin token dtype (default uint16)")
    g.add_argument("--vocab-size", type=int, help="default: 256 for bytes, max id + 1 rounded up to 64 for uint16")
    g.add_argument("--corpus", choices=("python", "english"),
                   help="no --data: python = bytes of the stdlib's .py files (default); english = BPE-tokenised "
                        "English prose that installed software ships (docstrings, plus --text-root docs)")
    g.add_argument("--corpus-root", help="directory of .py files for the corpus (default: the stdlib; english: "
                                         "site-packages and the stdlib)")
    g.add_argument("--text-root", help="english: comma-separated directories of .html/.txt/.rst documentation to add "
                                       "(e.g. an unpacked Debian linux-doc package)")
    g.add_argument("--bpe-vocab", type=int, help="english: BPE vocabulary size (default 8192)")
    g.add_argument("--val-every", type=int, help="default corpus: every Nth file is validation (default 20)")
    g.add_argument("--cache-dir", help=f"where the default corpus is cached (default {DEFAULT_CACHE})")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--eval-every", type=int, help="validate every N steps (and at the end)")
    g.add_argument("--eval-iters", type=int, help="validation batches (the same windows every time)")
    g.add_argument("--log-every", type=int, help="print a progress line every N steps")
    g.add_argument("--progress", choices=("auto", "on", "off"),
                   help="live progress bar (step, loss, tokens/s, MFU, ETA) redrawn every step; auto = on a terminal")
    g.add_argument("--out", help="directory for log.jsonl, summary.json and ckpt.pt (+ ckpt.pt.sha256); one run "
                                 "at a time writes it (a lock file, .lock, is held for the run)")
    g.add_argument("--ckpt-every", type=int, help="save ckpt.pt every N steps (0: only at the end); needs --out")
    g.add_argument("--no-save", action="store_const", const=True, help="never write ckpt.pt (logs and summary only)")
    g.add_argument("--max-minutes", type=float,
                   help="stop after this much training wall time (then validate and write the summary); 0 = no limit")
    g.add_argument("--resume", help="checkpoint file, or a directory holding ckpt.pt; its checksum file "
                                    "(ckpt.pt.sha256) must be beside it")
    g.add_argument("--peak-tflops", type=float,
                   help="peak dense TFLOP/s per device for the MFU estimate (default: 989 for H100/H200 bf16, "
                        "none on CPU)")
    return p


def from_argv(argv: Sequence[str]) -> TrainConfig:
    """Parse the command line (argparse exits 2 on a usage error) into a TrainConfig."""
    args = vars(build_parser().parse_args(list(argv)))
    given = {k: v for k, v in args.items() if v is not None and k != "preset"}
    values = dict(PRESETS.get(args["preset"], {}))
    values.update(given)
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names}, preset=args["preset"],
                       explicit=tuple(sorted(given)))

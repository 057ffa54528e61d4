"""``flashring train``: train a small long-context GPT whose attention is chosen by ``--attn``.

    flashring train --preset tiny                      # CPU, well under a minute
    flashring train --preset gpt-8k --attn flash --out runs/flash-8k
    torchrun --nproc-per-node 2 -m flashring train --preset gpt-16k --attn ring --out runs/ring-16k
    flashring train plot runs/*/log.jsonl --out loss.png

Under torchrun only ``--attn ring`` runs: every rank draws the same batch, keeps its zigzag shard of each
sequence (tokens, targets and global positions), and the parameters stay replicated.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ._benchutil import git_sha
from .data import DEFAULT_CACHE, Corpus, WindowSampler, file_corpus, stdlib_corpus
from .models.attention import ATTN_MODES, shard_for_ring
from .models.gpt import GPT, GPTConfig, train_flops_per_token

# Presets. Parameter counts (tied embeddings, vocab 256): tiny 0.115M, gpt-8k 25.3M, gpt-16k 85.2M (gpt-32k: the
# gpt-16k model at twice the length). Tokens per step: tiny 1k, the GPU presets 32k (11.6 / 46.4 / 76.1 TFLOP per
# step by train_flops_per_token for gpt-8k / 16k / 32k).
PRESETS: Dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, d_model=64, seqlen=128, batch_size=8, iters=40, lr=3e-3, warmup=4,
                 eval_every=20, eval_iters=2, log_every=5, ffn_chunk=256, ce_chunk=256),
    "gpt-8k": dict(n_layer=8, n_head=8, d_model=512, seqlen=8192, batch_size=4, iters=1000, lr=1e-3, warmup=100,
                   eval_every=200, eval_iters=8, log_every=10, ffn_chunk=8192, ce_chunk=8192),
    "gpt-16k": dict(n_layer=12, n_head=12, d_model=768, seqlen=16384, batch_size=2, iters=1000, lr=6e-4,
                    warmup=100, eval_every=200, eval_iters=8, log_every=10, ffn_chunk=8192, ce_chunk=8192),
    "gpt-32k": dict(n_layer=12, n_head=12, d_model=768, seqlen=32768, batch_size=1, iters=1000, lr=6e-4,
                    warmup=100, eval_every=200, eval_iters=8, log_every=10, ffn_chunk=8192, ce_chunk=8192),
    # The ring experiment's model (3.78B parameters, 20 heads x 128), sized so that one sequence of its length
    # does not fit one 141 GB H200 while a few hundred steps on two take minutes. Measured (BENCHMARKS.md): one
    # H200 fits 32,768 tokens (132.6 GiB peak: 49 GiB of weights, AdamW state and bf16 weight copies + 2.6 MiB
    # per token) and runs out of memory at 40,960; the ring on 2 H200s holds 40,960 in 101.5 GiB per GPU at
    # 3.6 s per step. The 85M gpt-16k model would need ~0.6M tokens to overflow a GPU, hours per few hundred steps.
    "gpt3b-ring": dict(n_layer=48, n_head=20, d_model=2560, seqlen=40960, batch_size=1, iters=300, lr=3e-4,
                       warmup=30, eval_every=50, eval_iters=2, log_every=10, ffn_chunk=8192, ce_chunk=8192),
}
# Used where neither the preset nor the command line sets a value.
DEFAULTS = dict(n_layer=6, n_head=6, d_model=384, ffn_mult=4, rope_base=10000.0, seqlen=1024, batch_size=8,
                grad_accum=1, iters=200, lr=1e-3, min_lr=None, warmup=20, lr_decay_iters=None, weight_decay=0.1,
                beta1=0.9, beta2=0.95, grad_clip=1.0, eval_every=100, eval_iters=4, log_every=10, ffn_chunk=4096,
                ce_chunk=4096, ckpt_every=0, max_minutes=0.0)
ARCH = GPTConfig.ARCH_FIELDS


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashring train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="`flashring train plot LOGS... --out loss.png` plots loss curves.")
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="model/run preset; explicit options override it")
    a("--attn", choices=ATTN_MODES, default="flash", help="attention kernel (models/attention.py)")
    a("--drop", type=float, default=0.5, help="qk-sparse: probability of dropping each query / key, per head")
    a("--buckets", type=int, default=8, help="hash-sparse: number of LSH buckets (even)")
    g = p.add_argument_group("model (default: preset, else a 6-layer 384-wide model)")
    g.add_argument("--n-layer", type=int)
    g.add_argument("--n-head", type=int)
    g.add_argument("--d-model", type=int)
    g.add_argument("--ffn-mult", type=int)
    g.add_argument("--rope-base", type=float)
    g = p.add_argument_group("memory")
    g.add_argument("--ffn-chunk", type=int, help="tokens per feed-forward chunk, 0 = unchunked")
    g.add_argument("--ce-chunk", type=int, help="tokens per cross-entropy chunk, 0 = unchunked")
    g.add_argument("--checkpoint", action="store_true", help="recompute each block in the backward")
    g = p.add_argument_group("optimisation")
    for name, typ, help_ in [("--seqlen", int, "tokens per sequence"), ("--batch-size", int, "sequences per step"),
                             ("--grad-accum", int, "micro-batches per step"), ("--iters", int, "optimizer steps"),
                             ("--lr", float, "peak learning rate"), ("--min-lr", float, "final lr (default lr/10)"),
                             ("--warmup", int, "linear warm-up steps"),
                             ("--lr-decay-iters", int, "cosine decay length (default: --iters)"),
                             ("--weight-decay", float, None), ("--beta1", float, None), ("--beta2", float, None),
                             ("--grad-clip", float, "max gradient norm, 0 = off")]:
        g.add_argument(name, type=typ, help=help_)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default=None, help="default: cuda if available (cuda:LOCAL_RANK under torchrun)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="token file: .npy (uint8/uint16), .bin (see --data-dtype) or text (bytes); "
                                  "default: the Python stdlib's .py sources")
    g.add_argument("--data-dtype", choices=("uint8", "uint16"), help=".bin token dtype (default uint16)")
    g.add_argument("--vocab-size", type=int, help="default: 256 for bytes, max id + 1 rounded up to 64 for uint16")
    g.add_argument("--corpus-root", help="directory of .py files for the default corpus (default: the stdlib)")
    g.add_argument("--val-every", type=int, default=20, help="default corpus: every Nth file is validation")
    g.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where the default corpus is cached")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--eval-every", type=int, help="validate every N steps (and at the end)")
    g.add_argument("--eval-iters", type=int, help="validation batches (the same windows every time)")
    g.add_argument("--log-every", type=int, help="print a progress line every N steps")
    g.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="live progress bar (step, loss, tokens/s, MFU, ETA) redrawn every step; auto = on a terminal")
    g.add_argument("--out", help="directory for log.jsonl, summary.json and ckpt.pt")
    g.add_argument("--ckpt-every", type=int, help="save ckpt.pt every N steps (0: only at the end); needs --out")
    g.add_argument("--no-save", action="store_true", help="never write ckpt.pt (logs and summary only)")
    g.add_argument("--max-minutes", type=float,
                   help="stop after this much training wall time (then validate and write the summary); 0 = no limit")
    g.add_argument("--resume", help="checkpoint file, or a directory holding ckpt.pt")
    g.add_argument("--peak-tflops", type=float,
                   help="peak dense TFLOP/s per device for the MFU estimate (default: 989 for H100/H200 bf16, "
                        "none on CPU)")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Preset values, overridden by explicit options, falling back to DEFAULTS; ``explicit`` lists options given."""
    preset = PRESETS.get(args.preset, {})
    cfg = dict(vars(args))
    cfg["explicit"] = sorted(k for k in DEFAULTS if cfg.get(k) is not None)
    for key, default in DEFAULTS.items():
        if cfg.get(key) is None:
            cfg[key] = preset.get(key, default)
    if cfg["min_lr"] is None:
        cfg["min_lr"] = cfg["lr"] / 10
    if cfg["lr_decay_iters"] is None:
        cfg["lr_decay_iters"] = cfg["iters"]
    return cfg


def validate_config(cfg: dict, world: int) -> None:
    positive = ["seqlen", "batch_size", "grad_accum", "iters", "eval_every", "eval_iters", "log_every",
                "lr_decay_iters", "val_every"]
    for key in positive:
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("warmup", "ckpt_every", "weight_decay", "grad_clip", "min_lr", "max_minutes"):
        if cfg[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if not cfg["lr"] > 0:
        raise ValueError(f"--lr must be > 0, got {cfg['lr']}")
    if cfg["peak_tflops"] is not None and not cfg["peak_tflops"] > 0:
        raise ValueError(f"--peak-tflops must be > 0, got {cfg['peak_tflops']}")
    if cfg["ckpt_every"] and not cfg["out"]:
        raise ValueError("--ckpt-every needs --out (the directory to write ckpt.pt into)")
    if world > 1 and cfg["attn"] != "ring":
        raise ValueError(f"WORLD_SIZE={world}, but only --attn ring splits work across processes (each rank holds "
                         f"a shard of the sequence); run --attn {cfg['attn']} as a single process")
    if cfg["attn"] == "ring" and cfg["seqlen"] % (2 * world):
        raise ValueError(f"--attn ring (zigzag layout) needs seqlen divisible by 2 * world size = {2 * world}; "
                         f"got seqlen {cfg['seqlen']}")


# ----------------------------------------------------------------------------------------------- environment
def default_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 tensor-core peak (vendor datasheets): H100/H200 SXM 989, H100 PCIe 756, A100 312."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        return 756.0 if "PCIe" in name else 989.0
    return 312.0 if "A100" in name else None


def environment(device: torch.device) -> dict:
    import flashring
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
            "numpy": np.__version__, "python": platform.python_version(), "flashring": flashring.__version__,
            "git_sha": git_sha(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node()}


class Dist:
    """Rank / world / group of this run; a single process is rank 0 of a world of 1 with no process group."""

    def __init__(self, cfg: dict):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        validate_config(cfg, self.world)
        if cfg["device"]:
            self.device = torch.device(cfg["device"])
        else:
            self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {cfg['device']}: CUDA is not available here")
            index = self.device.index if self.device.index is not None else 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"device cuda:{index} does not exist: {torch.cuda.device_count()} GPU(s) visible "
                                 f"(world size {self.world})")
            torch.cuda.set_device(index)
        self.group = None
        if self.world > 1:
            import torch.distributed as dist
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.group = dist.group.WORLD

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            # Ranks leave together: a gloo rank torn down while a peer was still busy aborted now and then
            # ("terminate called without an active exception": 1 of ~10 CPU test runs here).
            dist.barrier()
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- progress
def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class ProgressBar:
    """One self-redrawing status line: bar, step, loss, tokens/s and MFU (means over the last 10 steps), ETA.

    Drawn on rank 0 only; ``auto`` draws it when the stream is a terminal, so a log file keeps just the periodic
    lines. ``clear()`` wipes it before a normal line is printed, so the two never interleave.
    """

    WIDTH = 24
    WINDOW = 10

    def __init__(self, total: int, stream=None, mode: str = "auto"):
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = mode == "on" or (mode == "auto" and isatty())
        self.total = max(1, total)
        self.recent: List[float] = []
        self.shown = False

    def update(self, step: int, loss: float, step_s: float, tokens_per_step: int,
               flops_per_step: float, peak_flops: Optional[float]) -> None:
        if not self.enabled:
            return
        self.recent = (self.recent + [step_s])[-self.WINDOW:]
        mean_s = sum(self.recent) / len(self.recent)
        fill = int(self.WIDTH * min(1.0, step / self.total))
        mfu = "" if not peak_flops else f" | MFU {100 * flops_per_step / mean_s / peak_flops:.1f}%"
        eta = _fmt_duration(mean_s * max(0, self.total - step))
        self.stream.write(f"\r\033[K[{'#' * fill}{'.' * (self.WIDTH - fill)}] {step}/{self.total} | "
                          f"loss {loss:.4f} | {tokens_per_step / mean_s / 1e3:.1f}k tok/s{mfu} | ETA {eta}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


# ------------------------------------------------------------------------------------------------- training
def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from lr to min_lr at ``lr_decay_iters``; ``step`` 0-based."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    if step >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (step - cfg["warmup"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["lr"] - cfg["min_lr"])


def make_optimizer(model: GPT, cfg: dict, device: torch.device) -> torch.optim.AdamW:
    # weight decay on matrices (linear weights, embedding) only; LayerNorm gains and biases are not decayed
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=device.type == "cuda")


def load_corpus(cfg: dict) -> Corpus:
    if cfg["data"]:
        return file_corpus(cfg["data"], dtype=cfg["data_dtype"], vocab_size=cfg["vocab_size"])
    if cfg["data_dtype"]:
        raise ValueError("--data-dtype applies to a --data .bin file only")
    corpus = stdlib_corpus(cfg["corpus_root"], cfg["cache_dir"], cfg["val_every"])
    if cfg["vocab_size"] is not None and cfg["vocab_size"] < 256:
        raise ValueError(f"--vocab-size {cfg['vocab_size']} is too small for a byte corpus (256 ids)")
    return corpus


class Trainer:
    def __init__(self, cfg: dict, dist_: Dist):
        self.cfg, self.dist, self.device = cfg, dist_, dist_.device
        if cfg["dtype"] == "auto":
            cfg["dtype"] = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg["dtype"] == "bf16"
                         else contextlib.nullcontext())
        torch.manual_seed(cfg["seed"])
        self.corpus = load_corpus(cfg)
        ckpt = self._load_checkpoint() if cfg["resume"] else None
        arch = {k: cfg[k] for k in ARCH}
        arch["vocab_size"] = cfg["vocab_size"] or self.corpus.vocab_size
        if ckpt is not None:
            saved = ckpt["model_config"]
            clash = [k for k in ARCH if k in cfg["explicit"] + ["vocab_size"] and cfg.get(k) is not None
                     and cfg[k] != saved[k]]
            if clash:
                raise ValueError("--resume: the checkpoint's model has " + ", ".join(f"{k}={saved[k]}" for k in clash)
                                 + "; the command line asks for " + ", ".join(f"{k}={cfg[k]}" for k in clash))
            arch = {k: saved[k] for k in ARCH}
        for k in ARCH:
            cfg[k] = arch[k]  # so log metadata shows the model actually trained
        self.model_cfg = GPTConfig(**arch, attn=cfg["attn"], drop=cfg["drop"], buckets=cfg["buckets"],
                                   ffn_chunk=cfg["ffn_chunk"], ce_chunk=cfg["ce_chunk"], checkpoint=cfg["checkpoint"])
        with torch.device(self.device):  # initialise on the device: a 3.8B-parameter init on the CPU takes minutes
            self.model = GPT(self.model_cfg, group=dist_.group)
        self.n_params = self.model.num_params()
        if dist_.world > 1:  # same seed gives the same init, but make replication a fact, not an assumption
            import torch.distributed as dist
            for p in self.model.parameters():
                dist.broadcast(p.data, src=0, group=dist_.group)
        self.opt = make_optimizer(self.model, cfg, self.device)
        self.sampler = WindowSampler(self.corpus.train, cfg["batch_size"], cfg["seqlen"], cfg["seed"], "train")
        WindowSampler(self.corpus.val, 1, cfg["seqlen"], 0, "validation")  # fail now, not at the first eval
        self.step = 0
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sampler.load_state(ckpt["sampler"])
            torch.set_rng_state(ckpt["torch_rng"])
            if self.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
            self.step = ckpt["step"]
        peak = cfg["peak_tflops"] if cfg["peak_tflops"] is not None else default_peak_tflops(self.device)
        self.peak_flops = None if peak is None else peak * 1e12 * dist_.world
        self.tokens_per_step = cfg["batch_size"] * cfg["seqlen"] * cfg["grad_accum"]  # whole sequences, all ranks
        self.flops_per_step = train_flops_per_token(self.model_cfg, cfg["seqlen"], self.n_params) * self.tokens_per_step
        self.positions = torch.arange(cfg["seqlen"], device=self.device)[None]  # (1, S) global positions
        self.log_file = None
        self.bar = ProgressBar(cfg["iters"], mode=cfg["progress"] if dist_.main else "off")

    # ---- checkpoints
    def _load_checkpoint(self) -> dict:
        path = Path(self.cfg["resume"])
        if path.is_dir():
            path = path / "ckpt.pt"
        if not path.is_file():
            raise ValueError(f"--resume: no checkpoint at {str(path)!r}")
        # our own file: it holds numpy generator state (plain dicts) besides tensors
        return torch.load(path, map_location="cpu", weights_only=False)

    def save_checkpoint(self) -> None:
        if not (self.cfg["out"] and self.dist.main) or self.cfg["no_save"]:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                 "model_config": self.model_cfg.to_dict(), "sampler": self.sampler.state(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                 "config": _jsonable(self.cfg)}
        path = Path(self.cfg["out"]) / "ckpt.pt"
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # atomic: an interrupted save keeps the previous checkpoint

    # ---- logging
    def log(self, record: dict) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def say(self, line: str) -> None:
        if self.dist.main:
            self.bar.clear()
            print(line, flush=True)

    # ---- one batch
    def _shard(self, x: torch.Tensor, y: torch.Tensor):
        """Inputs, targets and global positions for this rank (a zigzag shard under ring attention)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        pos = self.positions
        if self.cfg["attn"] == "ring":
            x, y, pos = (shard_for_ring(t, self.dist.group, dim=1) for t in (x, y, pos))
        return x, y, pos

    def loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This rank's summed cross-entropy over its tokens (fp32, 0-dim)."""
        x, y, pos = self._shard(x, y)
        with self.autocast:
            return self.model(x, y, pos)

    def forward_backward(self) -> float:
        """Gradients of the global mean loss over one step's micro-batches, in every rank's ``.grad``; returns that
        loss (averaged over all tokens of all ranks)."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        batch_tokens = cfg["batch_size"] * cfg["seqlen"]  # targets per micro-batch summed over all ranks
        for _ in range(cfg["grad_accum"]):
            x, y = self.sampler.next()
            loss = self.loss_sum(x, y)
            # each rank backpropagates its token sum over the *global* token count, so the rank gradients add up
            # to the gradient of the global mean loss (ring attention's backward already routes the dk/dv of
            # other ranks' queries home): the all-reduce below is a sum, not a mean
            (loss / (batch_tokens * cfg["grad_accum"])).backward()
            total += loss.detach()
        if self.dist.world > 1:
            self._all_reduce_grads()
        return self.dist.all_reduce_sum(total).item() / (batch_tokens * cfg["grad_accum"])

    GRAD_BUCKET_BYTES = 256 << 20

    def _all_reduce_grads(self) -> None:
        """Sum gradients over ranks in ~256 MiB buckets: a few collectives, and no second copy of all gradients
        (one flat buffer would add 15 GB for the 3.8B-parameter preset)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        start = 0
        while start < len(grads):
            end, size = start, 0
            while end < len(grads) and (end == start or size + grads[end].nbytes <= self.GRAD_BUCKET_BYTES):
                size += grads[end].nbytes
                end += 1
            bucket = grads[start:end]
            flat = self.dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in bucket]))
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
            start = end

    def _out_of_time(self, started: float) -> bool:
        """True once --max-minutes of training have passed, agreed by all ranks (rank clocks differ slightly; a
        rank stopping alone would leave the others waiting in the ring)."""
        if not self.cfg["max_minutes"]:
            return False
        late = torch.tensor(float(time.perf_counter() - started > 60 * self.cfg["max_minutes"]), device=self.device)
        return self.dist.all_reduce_sum(late).item() > 0

    def train_step(self) -> float:
        lr = lr_at(self.step, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = self.forward_backward()
        if self.cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same ``eval_iters`` windows every time; its random draws (qk-sparse masks,
        LSH rotations) use a forked RNG so validating never shifts the training run's random stream."""
        self.model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg["seed"] + 1)
            sampler = WindowSampler(self.corpus.val, self.cfg["batch_size"], self.cfg["seqlen"], self.cfg["seed"] + 1,
                                    "validation")
            total = torch.zeros((), device=self.device)
            for _ in range(self.cfg["eval_iters"]):
                total += self.loss_sum(*sampler.next())
        self.model.train()
        n = self.cfg["eval_iters"] * self.cfg["batch_size"] * self.cfg["seqlen"]
        return self.dist.all_reduce_sum(total).item() / n

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, argv: List[str]) -> dict:
        cfg = self.cfg
        env = environment(self.device)
        if cfg["out"] and self.dist.main:
            out = Path(cfg["out"])
            out.mkdir(parents=True, exist_ok=True)
            self.log_file = open(out / "log.jsonl", "a" if cfg["resume"] else "w")
        meta = {"type": "meta", **env, "argv": argv, "world_size": self.dist.world, "n_params": self.n_params,
                "data": self.corpus.source, "train_tokens": len(self.corpus.train),
                "val_tokens": len(self.corpus.val), "resumed_at_step": self.step if cfg["resume"] else None,
                "config": _jsonable(cfg)}
        self.log(meta)
        mfu_note = "" if self.peak_flops is None else f", MFU vs {self.peak_flops / 1e12 / self.dist.world:g} TFLOP/s"
        self.say(f"flashring train: {self.n_params / 1e6:.2f}M params, attn {cfg['attn']}, seqlen {cfg['seqlen']}, "
                 f"{self.tokens_per_step} tokens/step, world {self.dist.world}, {env['device']} ({cfg['dtype']}"
                 f"{mfu_note})")
        self.say(f"data: {self.corpus.source}: {len(self.corpus.train):,} train / {len(self.corpus.val):,} val tokens")
        times: List[float] = []
        loss = val = float("nan")
        started, stopped_early = time.perf_counter(), False
        if self.step >= cfg["iters"]:
            self.say(f"checkpoint is at step {self.step} >= --iters {cfg['iters']}: nothing to train")
        while self.step < cfg["iters"]:
            self._sync()
            t0 = time.perf_counter()
            loss = self.train_step()  # .item() inside waits for the step
            self._sync()
            dt = time.perf_counter() - t0
            times.append(dt)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step}; try a lower --lr")
            rec = {"type": "train", "step": self.step, "loss": loss, "lr": lr_at(self.step - 1, cfg),
                   "dt_ms": dt * 1e3, "tokens_per_s": self.tokens_per_step / dt,
                   "mfu": None if self.peak_flops is None else self.flops_per_step / dt / self.peak_flops}
            self.log(rec)
            self.bar.update(self.step, loss, dt, self.tokens_per_step, self.flops_per_step, self.peak_flops)
            if self.step % cfg["log_every"] == 0 or self.step == cfg["iters"]:
                mfu = "" if rec["mfu"] is None else f" | MFU {100 * rec['mfu']:.1f}%"
                self.say(f"step {self.step:>5}/{cfg['iters']} | loss {loss:.4f} | lr {rec['lr']:.2e} | "
                         f"{dt * 1e3:7.1f} ms/step | {rec['tokens_per_s'] / 1e3:8.1f}k tok/s{mfu}")
            if self.step % cfg["eval_every"] == 0 or self.step == cfg["iters"]:
                val = self.evaluate()
                self.log({"type": "val", "step": self.step, "val_loss": val})
                self.say(f"step {self.step:>5}/{cfg['iters']} | val loss {val:.4f}")
            saved = bool(cfg["ckpt_every"] and self.step % cfg["ckpt_every"] == 0) or self.step == cfg["iters"]
            if saved:
                self.save_checkpoint()
            if self.step < cfg["iters"] and self._out_of_time(started):
                stopped_early = True
                self.say(f"--max-minutes {cfg['max_minutes']:g} reached at step {self.step}/{cfg['iters']}")
                if self.step % cfg["eval_every"]:
                    val = self.evaluate()
                    self.log({"type": "val", "step": self.step, "val_loss": val})
                    self.say(f"step {self.step:>5}/{cfg['iters']} | val loss {val:.4f}")
                if not saved:  # resumable from here (a 3.8B-parameter checkpoint is 45 GB: never twice)
                    self.save_checkpoint()
                break
        # the first steps include Triton autotuning / allocator warm-up: left out of the timing summary
        steady = times[min(3, len(times) // 2):]
        mean_s = float(np.mean(steady)) if steady else float("nan")
        summary = {"type": "summary", "steps": self.step, "timed_steps": len(steady),
                   "iter_time_ms_mean": mean_s * 1e3,
                   "iter_time_ms_median": float(np.median(steady)) * 1e3 if steady else float("nan"),
                   "tokens_per_s": self.tokens_per_step / mean_s if steady else float("nan"),
                   "mfu": (self.flops_per_step / mean_s / self.peak_flops) if self.peak_flops and steady else None,
                   "final_train_loss": loss, "final_val_loss": val, "n_params": self.n_params,
                   "peak_mem_gib": (torch.cuda.max_memory_allocated(self.device) / 2**30
                                    if self.device.type == "cuda" else None),
                   "attn": cfg["attn"], "seqlen": cfg["seqlen"], "world_size": self.dist.world,
                   "tokens_per_s_per_gpu": (self.tokens_per_step / mean_s / self.dist.world if steady
                                            else float("nan")),
                   "stopped_early": stopped_early}
        self.log(summary)
        if self.log_file is not None:
            self.log_file.close()
            (Path(cfg["out"]) / "summary.json").write_text(json.dumps({**summary, "meta": meta}, indent=2) + "\n")
        mfu = "" if summary["mfu"] is None else f", MFU {100 * summary['mfu']:.1f}%"
        self.say(f"done: {summary['steps']} steps, {summary['iter_time_ms_mean']:.1f} ms/step, "
                 f"{summary['tokens_per_s'] / 1e3:.1f}k tok/s{mfu}, final val loss {val:.4f}")
        return summary


def _jsonable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


# ------------------------------------------------------------------------------------------------------ plot
def plot_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="flashring train plot", description="plot training / validation loss curves")
    p.add_argument("logs", nargs="+", help="log.jsonl files written by flashring train --out")
    p.add_argument("--out", default="loss.png", help="image file to write")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis")
    args = p.parse_args(argv)
    for log in args.logs:
        if not Path(log).is_file():
            p.error(f"log file {log!r} does not exist")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("flashring train plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, log in enumerate(args.logs):
        records = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
        meta = next((r for r in records if r.get("type") == "meta"), {})
        c = meta.get("config", {})
        label = f"{c.get('attn', '?')} S={c.get('seqlen', '?')} ({Path(log).parent.name or log})"
        per_step = c.get("batch_size", 1) * c.get("seqlen", 1) * c.get("grad_accum", 1)
        scale = per_step if args.x == "tokens" else 1
        train = [(r["step"] * scale, r["loss"]) for r in records if r.get("type") == "train"]
        val = [(r["step"] * scale, r["val_loss"]) for r in records if r.get("type") == "val"]
        if not train and not val:
            p.error(f"{log} holds no train or val records")
        color = f"C{i % 10}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.5, linewidth=0.8, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), "o-", color=color, label=f"{label} val")
    ax.set_xlabel("tokens" if args.x == "tokens" else "step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------------ main
def _oom_message(cfg: dict, dist_: Optional[Dist]) -> str:
    where = ""
    if dist_ is not None and dist_.device.type == "cuda":
        total = torch.cuda.get_device_properties(dist_.device).total_memory
        where = (f" on {dist_.device} (peak {torch.cuda.max_memory_allocated(dist_.device) / 2**30:.1f} GiB allocated "
                 f"of {total / 2**30:.1f} GiB)")
    return (f"out of GPU memory{where} at seqlen {cfg['seqlen']} x batch {cfg['batch_size']}, world size "
            f"{dist_.world if dist_ else 1}. Options: --checkpoint (recompute blocks), a smaller --ffn-chunk / "
            "--ce-chunk, a smaller --batch-size with --grad-accum, or --attn ring over more GPUs (torchrun) so each "
            "holds seqlen / world tokens")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        return plot_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse errors exit with status 2
    cfg = resolve_config(args)
    dist_ = None
    try:
        dist_ = Dist(cfg)
        Trainer(cfg, dist_).run(argv)
    except (ValueError, NotImplementedError, TypeError) as e:
        print(f"flashring train: error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"flashring train: error: {_oom_message(cfg, dist_)}", file=sys.stderr)
        return 3
    finally:
        if dist_ is not None:
            dist_.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training loop of ``flashring train``: set-up, then one visible loop (step, log, validate, checkpoint).

Under torchrun only ``--attn ring`` runs: every rank draws the same batch and keeps its zigzag shard of each
sequence (``data.Batches``); the model is replicated and wrapped in ``DistributedDataParallel``, whose bucketed
gradient all-reduce overlaps the backward (on its own process group, so it never interleaves with the ring's
point-to-point traffic).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import IO, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..metadata import run_metadata
from .config import ARCH_DEFAULTS, MODEL_FIELDS, PRESETS, TrainConfig, flag
from .data import Batches, Corpus, WindowSampler, file_corpus, stdlib_corpus
from .english import corpus_dir, english_corpus
from .model import GPT, CausalAttention, GPTConfig, train_flops_per_token
from .progress import ProgressBar


class Env:
    """Rank / world / device / process groups of this run; a single process is rank 0 of a world of 1."""

    def __init__(self, cfg: TrainConfig):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cfg.validate(self.world)
        if cfg.device:
            try:
                self.device = torch.device(cfg.device)
            except RuntimeError as exc:
                raise ValueError(f"--device {cfg.device!r}: {exc}") from None
        else:
            self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {cfg.device}: CUDA is not available here")
            index = self.device.index if self.device.index is not None else 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"device cuda:{index} does not exist: {torch.cuda.device_count()} GPU(s) visible "
                                 f"(world size {self.world})")
            torch.cuda.set_device(index)
        elif self.device.type != "cpu":
            raise ValueError(f"--device {cfg.device}: only cuda and cpu devices are supported")
        self.group = self.grad_group = None
        if self.world > 1:
            import torch.distributed as dist
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
            self.group = dist.group.WORLD                     # ring attention's K/V traffic
            self.grad_group = dist.new_group(backend=backend)  # DDP's gradient all-reduce

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()           # ranks leave together: a gloo rank torn down while a peer is busy can abort
            dist.destroy_process_group()


def default_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 tensor-core peak (vendor datasheets): H100/H200 SXM 989, H100 PCIe 756, A100 312."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        return 756.0 if "PCIe" in name else 989.0
    return 312.0 if "A100" in name else None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from lr to min_lr at ``lr_decay_iters``; ``step`` 0-based."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup) / max(1, cfg.lr_decay_iters - cfg.warmup)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # weight decay on matrices (linear weights, embedding) only; LayerNorm gains and biases are not decayed
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def load_corpus(cfg: TrainConfig) -> Corpus:
    if cfg.data and Path(cfg.data).is_dir():
        if cfg.data_dtype:
            raise ValueError("--data-dtype applies to a --data .bin file, not a corpus directory")
        return corpus_dir(cfg.data)
    if cfg.data:
        return file_corpus(cfg.data, dtype=cfg.data_dtype, vocab_size=cfg.vocab_size)
    if cfg.data_dtype:
        raise ValueError("--data-dtype applies to a --data .bin file only")
    try:
        if cfg.corpus == "english":
            roots = [cfg.corpus_root] if cfg.corpus_root else None
            text_roots = [r for r in (cfg.text_root or "").split(",") if r]
            return english_corpus(roots, text_roots, cfg.cache_dir, cfg.val_every, cfg.bpe_vocab)
        corpus = stdlib_corpus(cfg.corpus_root, cfg.cache_dir, cfg.val_every)
    except OSError as exc:          # reading the sources (--corpus-root) or writing their cache (--cache-dir)
        raise ValueError(f"--corpus-root / --cache-dir: {exc.filename}: {exc.strerror or exc}") from None
    if cfg.vocab_size is not None and cfg.vocab_size < 256:
        raise ValueError(f"--vocab-size {cfg.vocab_size} is too small for a byte corpus (256 ids)")
    return corpus


def requested_model(cfg: TrainConfig) -> Dict[str, str]:
    """The model fields this command line sets, each with the option that set it (a flag, else --preset)."""
    asked = {k: f"--{flag(k)}" for k in MODEL_FIELDS if k in cfg.explicit}
    for k in PRESETS.get(cfg.preset, {}):
        if k in MODEL_FIELDS:
            asked.setdefault(k, f"--preset {cfg.preset}")
    return asked


def model_config(cfg: TrainConfig, corpus: Corpus, saved: Optional[dict] = None,
                 ckpt: str = "the checkpoint") -> Tuple[GPTConfig, List[str]]:
    """The model to train, and the settings a checkpoint overrode ("n_layer=2 (not 6)"). On --resume the model is
    the checkpoint's (``saved``); a model field the command line sets explicitly or through --preset must agree
    with it, and the data's token ids must fit its vocabulary."""
    arch = {k: getattr(cfg, k) for k in MODEL_FIELDS}
    arch["vocab_size"] = cfg.vocab_size or corpus.vocab_size
    arch["n_positions"] = cfg.seqlen if cfg.positions == "learned" else 0
    overridden: List[str] = []
    if saved is None:
        if cfg.vocab_size:
            corpus.check_vocab(cfg.vocab_size, "--vocab-size", "; pass --vocab-size {need} or more, or leave it out")
    else:
        saved = {**ARCH_DEFAULTS, **saved}
        asked = requested_model(cfg)
        clash = [k for k in asked if arch[k] != saved[k]]
        if clash:
            raise ValueError(f"--resume {ckpt}: the checkpoint's model has "
                             + ", ".join(f"{k}={saved[k]}" for k in clash) + "; the command line asks for "
                             + ", ".join(f"{k}={arch[k]} ({asked[k]})" for k in clash)
                             + "; drop those options to continue the checkpoint's model")
        fields = MODEL_FIELDS + tuple(ARCH_DEFAULTS)
        overridden = [f"{k}={saved[k]} (not {arch[k]})" for k in MODEL_FIELDS if saved[k] != arch[k]]
        arch = {k: saved[k] for k in fields}
        if arch["positions"] == "learned" and cfg.seqlen > arch["n_positions"]:
            raise ValueError(f"--resume {ckpt}: the checkpoint's model learned {arch['n_positions']} positions; "
                             f"--seqlen {cfg.seqlen} needs more")
        corpus.check_vocab(arch["vocab_size"], f"the vocabulary of --resume {ckpt}",
                           "; this data does not fit that model")
    for k, v in arch.items():
        if k in MODEL_FIELDS:
            setattr(cfg, k, v)                             # so the log's metadata shows the model trained
    return GPTConfig(**arch, attn=cfg.attn, drop=cfg.drop, buckets=cfg.buckets, lsh_unit_norm=cfg.lsh_unit_norm,
                     strict_causal=cfg.strict_causal, ffn_chunk=cfg.ffn_chunk, ce_chunk=cfg.ce_chunk,
                     checkpoint=cfg.checkpoint), overridden


# ------------------------------------------------------------------------------------------------- checkpoints
# Each ckpt.pt has a sha256 of its bytes in ckpt.pt.sha256 (sha256sum format), checked before it is loaded: a
# truncated or altered copy is refused instead of loading silently (and diverging later as "loss is nan"). The
# check reads the file once more (sha256 runs at ~1-2 GB/s: seconds next to the load itself).
CKPT_KEYS = ("model", "optimizer", "step", "model_config", "sampler", "torch_rng", "config")


def checkpoint_path(cfg: TrainConfig) -> Path:
    path = Path(cfg.resume)
    return path / "ckpt.pt" if path.is_dir() else path


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class _HashingWriter(io.RawIOBase):
    """Hashes the bytes torch.save writes, so a save reads nothing back. torch.save only appends to a file object;
    were it ever to seek, RawIOBase.seek raises, so a wrong digest cannot be written silently."""

    def __init__(self, f):
        super().__init__()
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()


def read_checksums(path: Path) -> List[str]:
    """The sha256 digests listed in a checksum file (none when it is missing)."""
    if not path.is_file():
        return []
    words = (line.split()[0].lower() for line in path.read_text(errors="replace").splitlines() if line.strip())
    return [w for w in words if len(w) == 64 and all(c in "0123456789abcdef" for c in w)]


def write_checksums(path: Path, digests: Sequence[str], name: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{d}  {name}\n" for d in dict.fromkeys(digests)))
    tmp.replace(path)


def load_checkpoint(cfg: TrainConfig) -> dict:
    """The --resume checkpoint, verified against its checksum file; ValueError naming the file otherwise."""
    path = checkpoint_path(cfg)
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint at {str(path)!r}")
    sums = checksum_path(path)
    try:
        expected, actual = read_checksums(sums), file_sha256(path)
    except OSError as exc:
        raise ValueError(f"--resume {path}: cannot read it: {exc.strerror or exc}") from None
    if not expected:
        raise ValueError(f"--resume {path}: no checksum file {sums.name} beside it to verify it against (flashring "
                         "train writes one with every checkpoint; copy both files)")
    if actual not in expected:
        raise ValueError(f"--resume {path}: its contents do not match {sums.name} (truncated or altered, e.g. by a "
                         "copy that did not finish); resume from an intact copy")
    try:
        # weights_only: tensors and plain containers only (the sampler state is a dict of ints), so a foreign
        # pickle is refused rather than run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"--resume {path}: not a checkpoint torch can load ({type(exc).__name__}: {why})") from None
    missing = [k for k in CKPT_KEYS if k not in state] if isinstance(state, dict) else list(CKPT_KEYS)
    if not missing and isinstance(state["model_config"], dict):
        state["model_config"] = {**ARCH_DEFAULTS, **state["model_config"]}     # older checkpoints lack new fields
        missing = [f"model_config.{k}" for k in MODEL_FIELDS if k not in state["model_config"]]
    if missing:
        raise ValueError(f"--resume {path}: not a flashring train checkpoint (it has no {', '.join(missing)})")
    return state


def save_checkpoint(run: "Run") -> None:
    cfg = run.cfg
    if not (cfg.out and run.env.main) or cfg.no_save:
        return
    state = {"model": run.raw_model.state_dict(), "optimizer": run.opt.state_dict(), "step": run.step,
             "model_config": run.model_cfg.to_dict(), "sampler": run.batches.sampler.state(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
             "config": cfg.to_dict()}
    path = Path(cfg.out) / "ckpt.pt"
    tmp, sums = path.with_suffix(".tmp"), checksum_path(path)
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)
    # A kill may land between any two of these steps; at every point the checksum file lists the digest of the
    # ckpt.pt on disk: first both the old and the new digest, then the rename (atomic: an interrupted save keeps
    # the previous checkpoint), then the new digest alone.
    digest = writer.sha.hexdigest()
    write_checksums(sums, [digest, *read_checksums(sums)], path.name)
    tmp.replace(path)
    write_checksums(sums, [digest], path.name)


# ------------------------------------------------------------------------------------------------- the output
LOCK_NAME = ".lock"


def lock_out_dir(out: Path) -> IO[str]:
    """Create --out and lock it for this run (held while the returned file is open): a second run writing the
    same directory would interleave its records with this run's in log.jsonl and overwrite its checkpoint."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"--out {out} exists and is not a directory; give a directory path") from None
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the directory: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the directory is not writable; choose another --out")
    try:
        lock = open(out / LOCK_NAME, "a+")
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write its lock file {LOCK_NAME}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise ValueError(f"--out {out} is in use by another flashring train run"
                         + (f" (pid {holder})" if holder.isdigit() else "")
                         + "; wait for it to finish or choose another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def claim_out_dir(cfg: TrainConfig, env: Env) -> Optional[IO[str]]:
    """:func:`lock_out_dir` on rank 0 (the only writer); every rank raises if it failed, so no rank is left
    waiting for rank 0 in a collective."""
    lock, error = None, None
    if cfg.out and env.main:
        try:
            lock = lock_out_dir(Path(cfg.out))
        except ValueError as exc:
            error = exc
    if env.world > 1:
        failed = env.sum(torch.tensor(float(error is not None), device=env.device)).item()
        if failed and error is None:
            raise ValueError(f"--out {cfg.out}: rank 0 cannot use it (its error says why)")
    if error is not None:
        raise error
    return lock


def open_log(out: Path, append: bool) -> IO[str]:
    path = out / "log.jsonl"
    try:
        log = open(path, "a" if append else "w")
        if append and log.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":   # a run killed mid-record: keep that line apart from the ones that follow
                    log.write("\n")
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write {path.name}: {exc.strerror or exc}") from None
    return log


# ------------------------------------------------------------------------------------------------- the run
class Run:
    """Everything built before the loop: data, model (DDP-wrapped under torchrun), optimizer, restored state."""

    def __init__(self, cfg: TrainConfig, env: Env):
        self.cfg, self.env, self.device = cfg, env, env.device
        if cfg.dtype == "auto":
            cfg.dtype = "bf16" if self.device.type == "cuda" else "fp32"
        if cfg.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"--cuda-graph needs a CUDA device (got {self.device})")
        # a captured graph must not depend on autocast's cast cache (torch.cuda.make_graphed_callables)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not cfg.cuda_graph)
                         if cfg.dtype == "bf16" else contextlib.nullcontext())
        torch.manual_seed(cfg.seed)
        self.corpus = load_corpus(cfg)
        ckpt = load_checkpoint(cfg) if cfg.resume else None
        where = str(checkpoint_path(cfg)) if ckpt is not None else ""
        self.model_cfg, overridden = model_config(cfg, self.corpus, None if ckpt is None else ckpt["model_config"],
                                                  where)
        if overridden and env.main:
            print(f"--resume {where}: the checkpoint sets the model: {', '.join(overridden)}", flush=True)
        with torch.device(self.device):  # initialise on the device: a 3.8B-parameter init on the CPU takes minutes
            self.raw_model = GPT(self.model_cfg, group=env.group)
        self.model = self.raw_model
        if env.world > 1:                # DDP broadcasts rank 0's weights, then averages gradients over ranks
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(self.raw_model, process_group=env.grad_group,
                                                 device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.n_params = self.raw_model.num_params()
        self.opt = make_optimizer(self.raw_model, cfg, self.device)
        ring = cfg.attn == "ring"
        self.batches = Batches(WindowSampler(self.corpus.train, cfg.batch_size, cfg.seqlen, cfg.seed, "train"),
                               self.device, env.group, ring)
        WindowSampler(self.corpus.val, 1, cfg.seqlen, 0, "validation")  # fail now, not at the first eval
        self.step = 0
        if ckpt is not None:
            try:
                self.raw_model.load_state_dict(ckpt["model"])
                self.opt.load_state_dict(ckpt["optimizer"])
                self.batches.sampler.load_state(ckpt["sampler"])
                torch.set_rng_state(ckpt["torch_rng"])
                if self.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
                self.step = int(ckpt["step"])
            except (RuntimeError, KeyError, TypeError, ValueError) as exc:
                why = (str(exc).strip().splitlines() or [""])[0][:200]
                raise ValueError(f"--resume {where}: its saved state does not fit the model it describes "
                                 f"({type(exc).__name__}: {why})") from None
        self.graphed, self.graph_kept = None, []
        if cfg.cuda_graph:
            self.graphed, self.graph_kept = capture_loss(self)
        peak = cfg.peak_tflops if cfg.peak_tflops is not None else default_peak_tflops(self.device)
        self.peak_flops = None if peak is None else peak * 1e12 * env.world
        self.tokens_per_step = cfg.batch_size * cfg.seqlen * cfg.grad_accum  # whole sequences, all ranks
        self.flops_per_step = train_flops_per_token(self.model_cfg, cfg.seqlen, self.n_params) * self.tokens_per_step

    def loss_sum(self, model, x, y, pos) -> torch.Tensor:
        """This rank's summed cross-entropy over its tokens (fp32, 0-dim)."""
        with self.autocast:
            return model(x, y, pos)


class LossModule(torch.nn.Module):
    """``Run.loss_sum`` as a module, the form ``torch.cuda.make_graphed_callables`` needs to find the parameters."""

    def __init__(self, run: Run):
        super().__init__()
        self.model, self.loss_sum = run.model, run.loss_sum

    def forward(self, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.loss_sum(self.model, x, y, pos)


def capture_loss(run: Run):
    """(graphed loss, kept-pair tensors): each micro-batch's forward and backward captured once in CUDA graphs
    (``torch.cuda.make_graphed_callables``; warm-up on random tokens of the batch's shape, gradients not
    accumulated) and replayed every step. Random draws inside (qk-sparse masks, LSH rotations) are fresh on
    every replay (PyTorch's graph-safe generator). The sparse cores measure their kept-pair fraction on every
    replay into tensors the graph owns, returned for the logging steps to read."""
    sparse = [m for m in run.raw_model.modules()
              if isinstance(m, CausalAttention) and m.mode in ("qk-sparse", "hash-sparse")]
    for m in sparse:
        m.measure = True
    # the capture's warm-up draws random numbers: a resumed run must continue the checkpoint's stream
    with torch.random.fork_rng(devices=[run.device.index or 0]):
        x = torch.randint(0, run.model_cfg.vocab_size, (run.cfg.batch_size, run.cfg.seqlen), device=run.device)
        sample = run.batches.place(x, torch.roll(x, -1, dims=1))
        graphed = torch.cuda.make_graphed_callables(LossModule(run), sample, num_warmup_iters=3,
                                                   allow_unused_input=True)
    # The graphed backward returns the same static gradient buffers on every replay, and autograd adopts such a
    # buffer as p.grad when p.grad is None, so with --grad-accum the next replay would overwrite the sum (each
    # step then held grad_accum x the last micro-batch's gradient). Gradients that always exist are added in
    # place instead; train_step zeroes them rather than dropping them.
    for prm in run.raw_model.parameters():
        prm.grad = torch.zeros_like(prm)
    kept = [m.kept for m in sparse]
    for m in sparse:
        m.measure = False                   # validation runs the eager model: nothing measured there
    return graphed, kept


def forward_backward(run: Run) -> float:
    """Gradients of the global mean loss over one step's ``grad_accum`` micro-batches, in every rank's ``.grad``;
    returns that loss (over all tokens of all ranks). Each rank backpropagates its token sum x world / global
    tokens: DDP averages over ranks, so the result is the gradient of the global mean (ring attention's backward
    already routes the dK/dV of other ranks' queries home)."""
    cfg, env = run.cfg, run.env
    total = torch.zeros((), device=run.device, dtype=torch.float64)
    tokens = cfg.batch_size * cfg.seqlen * cfg.grad_accum               # targets per step summed over all ranks
    for micro in range(cfg.grad_accum):
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last or env.world == 1 else run.model.no_sync()
        with sync:
            batch = run.batches.next()
            loss = run.graphed(*batch) if run.graphed is not None else run.loss_sum(run.model, *batch)
            (loss * env.world / tokens).backward()
        total += loss.detach()
    return env.sum(total).item() / tokens


def train_step(run: Run) -> float:
    """One optimizer step: learning rate, gradients, clipping, update. Returns the step's global mean loss."""
    for group in run.opt.param_groups:
        group["lr"] = lr_at(run.step, run.cfg)
    loss = forward_backward(run)
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), run.cfg.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=run.graphed is None)     # see capture_loss
    run.step += 1
    return loss


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean validation loss over the same ``eval_iters`` windows every time; its random draws (qk-sparse masks,
    LSH rotations) use a forked RNG so validating never shifts the training run's random stream."""
    cfg = run.cfg
    run.raw_model.eval()
    devices = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 1)
        val = Batches(WindowSampler(run.corpus.val, cfg.batch_size, cfg.seqlen, cfg.seed + 1, "validation"),
                      run.device, run.env.group, cfg.attn == "ring")
        total = torch.zeros((), device=run.device)
        for _ in range(cfg.eval_iters):
            total += run.loss_sum(run.raw_model, *val.next())
    run.raw_model.train()
    return run.env.sum(total).item() / (cfg.eval_iters * cfg.batch_size * cfg.seqlen)


def out_of_time(run: Run, started: float) -> bool:
    """True once --max-minutes of training have passed, agreed by all ranks (rank clocks differ slightly; a rank
    stopping alone would leave the others waiting in the ring)."""
    if not run.cfg.max_minutes:
        return False
    late = torch.tensor(float(time.perf_counter() - started > 60 * run.cfg.max_minutes), device=run.device)
    return run.env.sum(late).item() > 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(cfg: TrainConfig, env: Env, argv: List[str]) -> dict:
    """Train; returns the summary (also written to ``--out``/summary.json). --out is claimed (created and
    locked) before anything is built, and log.jsonl opened only once the run is set up, so a run refused for bad
    input never touches the files of the run it would have continued."""
    with contextlib.ExitStack() as files:
        lock = claim_out_dir(cfg, env)
        if lock is not None:
            files.enter_context(lock)
        run = Run(cfg, env)
        log_file = files.enter_context(open_log(Path(cfg.out), bool(cfg.resume))) if lock is not None else None
        return run_loop(run, argv, log_file)


def run_loop(run: Run, argv: List[str], log_file: Optional[IO[str]]) -> dict:
    """The loop of :func:`train`: steps, logs, validation, checkpoints, then the summary."""
    cfg, env = run.cfg, run.env
    bar = ProgressBar(cfg.iters, mode=cfg.progress if env.main else "off")

    def log(record: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def say(line: str) -> None:
        if env.main:
            bar.clear()
            print(line, flush=True)

    def validate() -> float:
        val = evaluate(run)
        log({"type": "val", "step": run.step, "val_loss": val})
        say(f"step {run.step:>5}/{cfg.iters} | val loss {val:.4f}")
        return val

    meta = run_metadata(env.device, ["flashring", "train", *argv], world_size=env.world, n_params=run.n_params,
                        data=run.corpus.source, train_tokens=len(run.corpus.train), val_tokens=len(run.corpus.val),
                        resumed_at_step=run.step if cfg.resume else None, config=cfg.to_dict())
    log(meta)
    mfu_note = "" if run.peak_flops is None else f", MFU vs {run.peak_flops / 1e12 / env.world:g} TFLOP/s"
    say(f"flashring train: {run.n_params / 1e6:.2f}M params, attn {cfg.attn}, seqlen {cfg.seqlen}, "
        f"{run.tokens_per_step} tokens/step, world {env.world}, {meta['device']} ({cfg.dtype}{mfu_note})")
    say(f"data: {run.corpus.source}: {len(run.corpus.train):,} train / {len(run.corpus.val):,} val tokens")
    times: List[float] = []
    sparse = cfg.attn in ("qk-sparse", "hash-sparse")
    loss = val = float("nan")
    started, stopped_early = time.perf_counter(), False
    if run.step >= cfg.iters:
        say(f"checkpoint is at step {run.step} >= --iters {cfg.iters}: nothing to train")
    while run.step < cfg.iters:
        logged = (run.step + 1) % cfg.log_every == 0 or run.step + 1 == cfg.iters
        attns = [m for m in run.model.modules() if isinstance(m, CausalAttention)] if sparse and not run.graphed \
            else []
        for m in attns:
            m.measure = logged                             # kept-pair fractions on logged steps only
        _sync(run.device)
        t0 = time.perf_counter()
        loss = train_step(run)                             # .item() inside waits for the step
        dt = time.perf_counter() - t0
        times.append(dt)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {run.step}; try a lower --lr")
        rec = {"type": "train", "step": run.step, "loss": loss, "lr": lr_at(run.step - 1, cfg), "dt_ms": dt * 1e3,
               "tokens_per_s": run.tokens_per_step / dt,
               "mfu": None if run.peak_flops is None else run.flops_per_step / dt / run.peak_flops}
        if logged and attns:                   # per layer (the last micro-batch's call); forward only
            rec["kept_pairs"] = [None if m.kept is None else round(float(m.kept), 5) for m in attns]
            for m in attns:
                m.measure = False              # validation passes are not measured
        elif logged and run.graph_kept:        # the graph measures every replay; read the last one
            rec["kept_pairs"] = [round(float(k), 5) for k in run.graph_kept]
        log(rec)
        bar.update(run.step, loss, dt, run.tokens_per_step, run.flops_per_step, run.peak_flops)
        if run.step % cfg.log_every == 0 or run.step == cfg.iters:
            mfu = "" if rec["mfu"] is None else f" | MFU {100 * rec['mfu']:.1f}%"
            say(f"step {run.step:>5}/{cfg.iters} | loss {loss:.4f} | lr {rec['lr']:.2e} | {dt * 1e3:7.1f} ms/step | "
                f"{rec['tokens_per_s'] / 1e3:8.1f}k tok/s{mfu}")
        if run.step % cfg.eval_every == 0 or run.step == cfg.iters:
            val = validate()
        saved = bool(cfg.ckpt_every and run.step % cfg.ckpt_every == 0) or run.step == cfg.iters
        if saved:
            save_checkpoint(run)
        if run.step < cfg.iters and out_of_time(run, started):
            stopped_early = True
            say(f"--max-minutes {cfg.max_minutes:g} reached at step {run.step}/{cfg.iters}")
            if run.step % cfg.eval_every:
                val = validate()
            if not saved:          # resumable from here (a 3.8B-parameter checkpoint is 45 GB: never twice)
                save_checkpoint(run)
            break
    # the first steps include Triton compilation / allocator warm-up: left out of the timing summary
    steady = times[min(3, len(times) // 2):]
    mean_s = float(np.mean(steady)) if steady else float("nan")
    summary = {"type": "summary", "steps": run.step, "timed_steps": len(steady), "iter_time_ms_mean": mean_s * 1e3,
               "iter_time_ms_median": float(np.median(steady)) * 1e3 if steady else float("nan"),
               "tokens_per_s": run.tokens_per_step / mean_s if steady else float("nan"),
               "mfu": (run.flops_per_step / mean_s / run.peak_flops) if run.peak_flops and steady else None,
               "final_train_loss": loss, "final_val_loss": val, "n_params": run.n_params,
               "peak_mem_gib": (torch.cuda.max_memory_allocated(run.device) / 2**30
                                if run.device.type == "cuda" else None),
               "attn": cfg.attn, "seqlen": cfg.seqlen, "world_size": env.world,
               "tokens_per_s_per_gpu": run.tokens_per_step / mean_s / env.world if steady else float("nan"),
               "stopped_early": stopped_early}
    log(summary)
    if log_file is not None:
        log_file.close()
        try:
            (Path(cfg.out) / "summary.json").write_text(json.dumps({**summary, "meta": meta}, indent=2) + "\n")
        except OSError as exc:      # the log already holds the summary record
            raise ValueError(f"--out {cfg.out}: cannot write summary.json: {exc.strerror or exc}") from None
    mfu = "" if summary["mfu"] is None else f", MFU {100 * summary['mfu']:.1f}%"
    say(f"done: {summary['steps']} steps, {summary['iter_time_ms_mean']:.1f} ms/step, "
        f"{summary['tokens_per_s'] / 1e3:.1f}k tok/s{mfu}, final val loss {val:.4f}")
    return summary

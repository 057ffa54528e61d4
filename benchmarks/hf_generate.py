"""End-to-end ``generate()`` throughput of a ~1.1B-parameter random-init Llama (TinyLlama-1.1B's shape: hidden
2048, 22 layers, 32 query / 4 KV heads) in Hugging Face transformers, attention by flashring's plug-in vs
``attn_implementation="sdpa"``, in one process.

    PYTHONPATH=src python benchmarks/hf_generate.py --out OUT

For each (batch, prompt length): greedy decoding of --new-tokens tokens after one warm-up call; new tokens/s =
batch x new tokens / wall time of the call (prefill included, as a user sees it). The two implementations' token
ids are compared (bf16: a few late divergences are expected from rounding; the tests check identical ids in fp32).
Writes hf-generate.jsonl (metadata line + rows); prints a table last.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from flashring.bench import harness as H  # noqa: E402
from flashring.integrations.transformers import ATTN_IMPLEMENTATION  # noqa: E402
from flashring.metadata import run_metadata  # noqa: E402

SHAPES = [(1, 4096), (8, 2048), (32, 512), (8, 16384)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--shapes", default=",".join(f"{b}x{p}" for b, p in SHAPES),
                    help="comma list of BATCHxPROMPT (default: %(default)s)")
    ap.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                    help="transformers' KV cache; static: fixed-size buffers, and generate() compiles the decode "
                         "step (CUDA graphs) where transformers does so by default")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    import transformers
    try:
        shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
        assert all(len(sh) == 2 and min(sh) > 0 for sh in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes: expected e.g. 1x4096,8x2048, got {args.shapes!r}")
    dev = torch.device("cuda")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()       # one set of weights, attention swapped
    n_params = sum(p.numel() for p in base.parameters())
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(dev, sys.argv, transformers=transformers.__version__, n_params=n_params,
                        attn_implementation=ATTN_IMPLEMENTATION)
    g = torch.Generator(device=dev).manual_seed(1)
    for batch, prompt in shapes:
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=dev, generator=g)
        outs = {}
        for impl in ("sdpa", ATTN_IMPLEMENTATION):
            if hasattr(base, "set_attn_implementation"):
                base.set_attn_implementation(impl)
            else:
                base.config._attn_implementation = impl
            static = dict(cache_implementation="static") if args.cache == "static" else {}
            if static:      # each implementation compiles its own decode step (and a failure leaves no state)
                torch.compiler.reset()
            kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=0, **static)
            try:
                with torch.no_grad():
                    # warm-up on the timed shapes: every kernel variant the timed call needs (prefill tiles,
                    # the decode split count of this cache length) is compiled before the clock starts; a static
                    # cache is sized prompt + max_new_tokens and its compiled step specialised on that size, so
                    # its warm-up is the timed call itself
                    warm = kw if static else dict(kw, max_new_tokens=2, min_new_tokens=2)
                    base.generate(ids, **warm)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = base.generate(ids, **kw)
                    torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                outs[impl] = out[:, prompt:]
                rows.append(dict(batch=batch, prompt=prompt, impl=impl, cache=args.cache, seconds=dt,
                                 new_tokens_per_s=batch * args.new_tokens / dt, error=None))
            except Exception as exc:                     # e.g. OOM of the materialised SDPA mask at 16k
                rows.append(dict(batch=batch, prompt=prompt, impl=impl, cache=args.cache, seconds=None,
                                 new_tokens_per_s=None,
                                 error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"))
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
        if len(outs) == 2:
            same = (outs["sdpa"] == outs[ATTN_IMPLEMENTATION]).float().mean().item()
            for r in rows[-2:]:
                r["ids_equal_fraction"] = same
        del ids, outs
        torch.cuda.empty_cache()
    H.write_jsonl(args.out / "hf-generate.jsonl", [meta] + rows)
    print(f"\ngenerate() on {meta['device']}, transformers {transformers.__version__}, {n_params / 1e9:.2f}B params, "
          f"bf16, {args.new_tokens} new tokens, greedy")
    print(f"{'batch':>5} {'prompt':>6} {'sdpa tok/s':>11} {ATTN_IMPLEMENTATION + ' tok/s':>12} {'ratio':>6} "
          f"{'same ids':>8}")
    for batch, prompt in shapes:
        r = {x["impl"]: x for x in rows if x["batch"] == batch and x["prompt"] == prompt}
        a, b = r["sdpa"]["new_tokens_per_s"], r[ATTN_IMPLEMENTATION]["new_tokens_per_s"]
        print(f"{batch:>5} {prompt:>6} {a or 0:>11.1f} {b or 0:>12.1f} {(b / a if a and b else 0):>6.2f} "
              f"{r[ATTN_IMPLEMENTATION].get('ids_equal_fraction', float('nan')):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

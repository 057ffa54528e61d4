"""flashring as a transformers attention implementation (flashring.integrations.transformers), on tiny random-weight
models built from configs: greedy generation (KV cache, with and without left padding) against eager, logits and
parameter gradients against an eager float64 copy under flashring.testing's tolerance rule, padded and packed
training batches against each sequence run alone.

On a CPU machine conftest.py turns the Triton interpreter on. The float64-rule tests (logits and gradients, with
and without padding) run flashring's Triton kernels under it, on sequences of <= 16 tokens; the generation and
packed-sequence tests, which make many small calls, use the chunked PyTorch CPU path (fixture ``torch_path``; one
generation case runs the kernels too) to keep the file fast.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashring  # noqa: E402
from flashring.integrations import transformers as fr_hf  # noqa: E402
from flashring.masks import flash_bounds  # noqa: E402
from flashring.testing import GRAD_FACTOR, OUT_FACTOR, attention_ref, check_close  # noqa: E402

VOCAB = 100
WINDOW = 4
# Weights 10x transformers' default scale, so attention scores are O(1) (not a near-uniform softmax), the sliding
# windows and Gemma2's softcap change the result, and greedy logits are well separated.
INIT = 0.2
MODELS = ["llama", "qwen2", "mistral", "gemma2", "gpt2"]


@pytest.fixture
def torch_path(monkeypatch):
    from flashring.ops import dispatch
    monkeypatch.setattr(dispatch, "CPU_BACKEND", "torch")


def make_config(name):
    common = dict(vocab_size=VOCAB, initializer_range=INIT, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, **common)
    if name == "llama":
        return transformers.LlamaConfig(**decoder)
    if name == "qwen2":   # layer 0 full attention, layer 1 sliding
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                        layer_types=["full_attention", "sliding_attention"], **decoder)
    if name == "mistral":  # every layer sliding
        return transformers.MistralConfig(sliding_window=WINDOW, **decoder)
    if name == "gemma2":   # layer 0 sliding, layer 1 full; scores capped at 2 and scaled by 32**-0.5 (head_dim 8)
        return transformers.Gemma2Config(head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=32,
                                         attn_logit_softcapping=2.0, **decoder)
    if name == "gpt2":     # no GQA; layer-dependent scaling (1/sqrt(d) / (layer_idx + 1))
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, scale_attn_by_inverse_layer_idx=True,
                                       **common)
    raise AssertionError(name)


def make_models(name):
    """(flashring fp32, eager fp32, eager fp64) copies of one random model."""
    ours = transformers.AutoModelForCausalLM.from_config(make_config(name),
                                                         attn_implementation=fr_hf.ATTN_IMPLEMENTATION)
    assert ours.config._attn_implementation == fr_hf.ATTN_IMPLEMENTATION
    eager = copy.deepcopy(ours)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    return ours, eager, copy.deepcopy(eager).double()


def tokens(*shape):
    return torch.randint(1, VOCAB, shape)


def check(out, ref, low, factor, what):
    c = check_close(out.detach(), ref.detach(), low.detach(), factor, dtype=torch.float32)
    assert c["ok"], f"{what}: error {c['err']:.3g} > tolerance {c['tol']:.3g}"
    return c


def separate_logits(model, ids, lengths):
    """Logits of each row's real tokens, every sequence run alone (batch 1, no padding); ``lengths``: per row, the
    lengths of the sequences packed into it (or its one real length)."""
    rows = []
    with torch.no_grad():
        for row, lens in zip(ids, lengths):
            start, parts = 0, []
            for n in lens:
                parts.append(model(input_ids=row[None, start:start + n]).logits[0])
                start += n
            rows.append(torch.cat(parts))
    return rows


# ------------------------------------------------------------------------------------------------- generation
def assert_same_greedy(ours, eager, ids, mask, max_new_tokens=6, **extra):
    kw = dict(attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
              pad_token_id=0, return_dict_in_generate=True, output_logits=True, **extra)
    with torch.no_grad():
        want = eager.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert got.sequences.shape == want.sequences.shape == (ids.shape[0], ids.shape[1] + max_new_tokens)
    assert torch.equal(got.sequences[:, :ids.shape[1]], ids)
    diff = (got.sequences != want.sequences).nonzero()
    if len(diff):
        # Greedy picks may only differ where eager itself had a near tie (same prefix up to there).
        row, col = diff[0].tolist()
        top2 = want.logits[col - ids.shape[1]][row].topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-4, f"row {row} diverges at token {col} without a near tie"
    # The prefill's logits (last prompt position, a real token in every row) agree, not just their argmax.
    torch.testing.assert_close(got.logits[0], want.logits[0], atol=1e-4, rtol=1e-4)


# Every model on the PyTorch CPU path, decode steps through flashring.flash_attn_with_kvcache and through the
# general paths (what decode_step does without it); Gemma2 (sliding + full layers, softcap) also through the Triton
# kernels.
@pytest.mark.parametrize("name,path,decode", [(m, "torch", d) for m in MODELS for d in ("kvcache", "general")]
                         + [("gemma2", "triton", "kvcache")])
def test_generate_matches_eager(name, path, decode, seed, monkeypatch):
    from flashring.ops import dispatch, flash
    if path == "triton" and not flash.INTERPRET:
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setattr(dispatch, "CPU_BACKEND", path)
    if decode == "general":
        monkeypatch.delattr(flashring, "flash_attn_with_kvcache", raising=False)
    # Prompts of 10 tokens (longer than the sliding window of 4) and of 2, whose padding stays inside the sliding
    # layers' cache (window - 1 keys) for the first decode step.
    assert_generation_matches(name, pad=8)


def assert_generation_matches(name, pad, **extra):
    """Greedy generation of a left-padded batch (row 1: ``pad`` padding tokens of 10) and of an unpadded one (the
    mask function hands the attention None) equals eager's."""
    ours, eager, _ = make_models(name)
    ours.eval(), eager.eval()
    ids = tokens(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    assert_same_greedy(ours, eager, ids, mask, **extra)
    assert_same_greedy(ours, eager, tokens(2, 7), None, **extra)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_generate_with_a_static_cache_matches_eager(name, seed, torch_path):
    """A static cache hands the attention every slot, the ones past the tokens seen so far unused (zeros). With or
    without a padding mask, only the real keys count: the mask function reads the cache's query offset (found when
    generate() without an attention_mask attended the empty slots and picked different tokens)."""
    assert_generation_matches(name, pad=6, cache_implementation="static")


def test_compiled_static_cache_decoding_matches_eager(seed, torch_path):
    """torch.compile(fullgraph=True) over a static-cache forward (what compiled generation runs): the traced mask
    function and decode step read no host values, and the prefill + decode logits match eager attention; then the
    cache is reset and reused with a 20-token prefill (more than a decode step's 16 queries: it used to be placed
    at the end of the cache, not after the tokens seen) and with a 32-token one that fills it (queries as many as
    slots: it used to reach the padded path's host read, a graph break)."""
    torch._dynamo.reset()
    logits = {}
    for impl in ("eager", fr_hf.ATTN_IMPLEMENTATION):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make_config("llama"), attn_implementation=impl).eval()
        fwd = torch.compile(model.forward, fullgraph=True, backend="aot_eager") if impl != "eager" else model.forward
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        steps = []
        with torch.no_grad():
            for prompt, new in ((9, 3), (20, 2), (32, 0)):
                cache.reset()
                ids = tokens(2, prompt)
                for _ in range(1 + new):                  # the prefill, then one-token steps
                    out = fwd(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
                    steps.append(out)
                    ids = out.argmax(-1, keepdim=True)
        logits[impl] = torch.stack(steps)
    torch.testing.assert_close(logits[fr_hf.ATTN_IMPLEMENTATION], logits["eager"], atol=1e-4, rtol=1e-4)


def test_compiled_generate_with_a_static_cache_compiles_once(seed, torch_path):
    """transformers' own compiled generation (a CompileConfig; on CPU through its all-devices switch): the decode
    steps see one mask shape (the slot mask is as long as the cache), so one graph serves every step, and the
    greedy ids and logits equal eager's, with left padding and without a mask. Before the slot mask the 2-D mask
    grew by one key per step: a recompile (a CUDA graph on a GPU) per step."""
    torch._dynamo.reset()
    ours, eager, _ = make_models("llama")
    ours.eval(), eager.eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    config = transformers.CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None)
    config._compile_all_devices = True
    ids = tokens(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :6], ids[1, :6] = 0, 0
    for m in (mask, None):
        kw = dict(attention_mask=m, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True, cache_implementation="static")
        with torch.no_grad():
            want = eager.generate(ids, **kw)
            got = ours.generate(ids, compile_config=config, **kw)
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=1e-4)
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 2 x 5 decode steps"     # one per mask kind at most


def test_compiled_static_cache_right_padding(seed, torch_path):
    """Traced calls find the queries' end in the slot mask, not from each row's last real token: a right-padded
    prompt into a static cache matches eager on its real tokens; the decode steps after it have padding *between*
    real tokens, which reaches the decode kernel as its key mask (generate() builds such masks itself from pad
    tokens inside a prompt)."""
    torch._dynamo.reset()
    ours, eager, _ = make_models("llama")
    ours.eval(), eager.eval()
    fwd = torch.compile(ours.forward, fullgraph=True, backend="aot_eager")
    ids, mask = tokens(2, 5), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    caches = [transformers.StaticCache(config=m.config, max_cache_len=24) for m in (ours, eager)]
    with torch.no_grad():
        got = fwd(input_ids=ids, attention_mask=mask, past_key_values=caches[0], use_cache=True).logits
        want = eager(input_ids=ids, attention_mask=mask, past_key_values=caches[1], use_cache=True).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
        for _ in range(2):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            step = dict(input_ids=tokens(2, 1), attention_mask=mask, use_cache=True)
            got = fwd(past_key_values=caches[0], **step).logits
            want = eager(past_key_values=caches[1], **step).logits
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


CALLS = []   # what reference_kvcache was called with


def reference_kvcache(q, k_cache, v_cache, cache_seqlens=None, cache_leftpad=None, softmax_scale=None, causal=False,
                      window_size=(-1, -1), softcap=0.0, key_padding_mask=None):
    """flash-attn's flash_attn_with_kvcache (no new k/v): row b attends cache keys [leftpad[b], seqlens[b]);
    cache_seqlens an int or an int32 (batch,) tensor; flashring's key_padding_mask (positions kept)."""
    if not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32)
    CALLS.append(dict(seqlens=cache_seqlens.tolist(),
                      leftpad=None if cache_leftpad is None else cache_leftpad.tolist(), sq=q.shape[1],
                      holes=key_padding_mask is not None))
    out = []
    for b in range(q.shape[0]):
        lo = 0 if cache_leftpad is None else int(cache_leftpad[b])
        hi = int(cache_seqlens[b])
        keep = None if key_padding_mask is None else key_padding_mask[b, lo:hi].view(1, 1, 1, 1, -1)
        lower, upper = flash_bounds(q.shape[1], hi - lo, causal, window_size)
        out.append(attention_ref(q[b:b + 1], k_cache[b:b + 1, lo:hi], v_cache[b:b + 1, lo:hi], softmax_scale,
                                 lower, upper, softcap, mask=keep, dtype=None)[0])
    return torch.cat(out)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_decode_step_uses_kvcache_function(name, seed, torch_path, monkeypatch):
    """With a ``flashring.flash_attn_with_kvcache`` present (here a reference of flash-attn's contract), decode
    steps go through it with the left padding as cache_leftpad; generation still matches eager."""
    monkeypatch.setattr(flashring, "flash_attn_with_kvcache", reference_kvcache, raising=False)
    CALLS.clear()
    ours, eager, _ = make_models(name)
    ours.eval(), eager.eval()
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert_same_greedy(ours, eager, ids, mask, max_new_tokens=4)
    layers = 2
    assert len(CALLS) == 3 * layers                      # 4 new tokens: 1 from the prefill, 3 decode steps
    for step, call in enumerate(CALLS[::layers]):
        assert call["sq"] == 1
        if name == "llama":                              # full cache: 9 prompt + generated tokens
            assert call["seqlens"] == [10 + step] * 2 and call["leftpad"] == [3, 0]
        else:                                            # sliding cache: window-size keys, padding out of reach
            assert call["seqlens"] == [WINDOW] * 2 and call["leftpad"] is None
    CALLS.clear()
    assert_same_greedy(ours, eager, tokens(2, 9), None, max_new_tokens=3)
    assert len(CALLS) == 2 * layers and all(c["leftpad"] is None for c in CALLS)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_padding_between_tokens_goes_to_the_decode_kernel_as_a_key_mask(name, seed, torch_path, monkeypatch):
    """Pad tokens inside a prompt (generate() masks them out itself): the decode steps keep the kvcache path, the
    holes as its key_padding_mask (positions, so windows, unchanged), and match eager; then through flashring's own
    kernel path."""
    ours, eager, _ = make_models(name)
    ours.eval(), eager.eval()
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[0, 4:6] = 0
    ids[0, 4:6] = 0
    monkeypatch.setattr(flashring, "flash_attn_with_kvcache", reference_kvcache, raising=False)
    CALLS.clear()
    assert_same_greedy(ours, eager, ids, mask, max_new_tokens=4)
    assert CALLS and all(c["holes"] for c in CALLS[:1])
    monkeypatch.undo()
    assert_same_greedy(ours, eager, ids, mask, max_new_tokens=4)


# ------------------------------------------------------------------------------------------------- float64 rule
def loss_and_grads(model, ids, mask=None, labels=None):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids if labels is None else labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_grads_within_tolerance(name, seed):
    """Training forward + backward (no padding, sequence 16 > window 4): logits within 2x and every parameter's
    gradient within 3x of eager fp32's error against eager fp64."""
    ours, eager, ref = make_models(name)
    for m in (ours, eager, ref):
        m.train()
    ids = tokens(2, 16)
    out, g_out = loss_and_grads(ours, ids)
    low, g_low = loss_and_grads(eager, ids)
    ref64, g_ref = loss_and_grads(ref, ids)
    check(out, ref64, low, OUT_FACTOR, f"{name} logits")
    assert set(g_out) == set(g_ref) and len(g_out) > 10
    for pname in g_ref:
        check(g_out[pname], g_ref[pname], g_low[pname], GRAD_FACTOR, f"{name} grad {pname}")


# ------------------------------------------------------------------------------------------------- padded / packed
@pytest.mark.parametrize("name", MODELS)
def test_right_padded_training_batch(name, seed):
    """Right padding (unpad + varlen): the real tokens' logits equal each sequence run alone, and gradients of the
    loss over real tokens are within the tolerance rule of eager fp64 on the same padded batch."""
    ours, eager, ref = make_models(name)
    for m in (ours, eager, ref):
        m.train()
    # 3 padding tokens, fewer than the window: eager's fp64 reference gives NaN (then NaN gradients through the
    # zero loss weight) on a padded query whose whole window is padding; flashring gives such a row 0.
    lengths = [14, 11]
    ids = tokens(2, 14)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out, g_out = loss_and_grads(ours, ids, mask, labels)
    alone = separate_logits(eager, ids, [[n] for n in lengths])
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :n], alone[b], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out).all()
    _, g_low = loss_and_grads(eager, ids, mask, labels)
    _, g_ref = loss_and_grads(ref, ids, mask, labels)
    for pname in g_ref:
        check(g_out[pname], g_ref[pname], g_low[pname], GRAD_FACTOR, f"{name} padded grad {pname}")


@pytest.mark.parametrize("name", MODELS)
def test_packed_position_ids(name, seed, torch_path):
    """Batch 2, several sequences per row marked by position_ids restarting at 0: each sequence's logits equal the
    sequence run alone (so no attention crosses a boundary), sequences longer than the sliding window included."""
    ours, eager, _ = make_models(name)
    ours.train()
    eager.eval()
    lengths = [[7, 3, 8], [5, 13]]
    ids = tokens(2, 18)
    pos = torch.tensor([sum((list(range(n)) for n in row), []) for row in lengths])
    with torch.no_grad():
        out = ours(input_ids=ids, position_ids=pos).logits
        crossed = ours(input_ids=ids).logits   # same tokens as one sequence per row: must differ after a boundary
    alone = separate_logits(eager, ids, lengths)
    for b in range(2):
        torch.testing.assert_close(out[b], alone[b], atol=1e-4, rtol=1e-4)
    assert (crossed[0, 7:] - out[0, 7:]).abs().max() > 1e-3


def test_explicit_cu_seq_lens(seed, torch_path):
    """DataCollatorWithFlattening's cu_seq_lens_q/k + max_length_q/k keyword arguments are used as given."""
    ours, eager, _ = make_models("llama")
    ours.eval(), eager.eval()
    lengths = [6, 11, 4]
    seqs = [tokens(n).tolist() for n in lengths]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in seqs])
    assert batch["cu_seq_lens_q"].tolist() == [0, 6, 17, 21]
    batch.pop("labels")
    with torch.no_grad():
        out = ours(**batch).logits[0]
        # position_ids without restarts: only the explicit tables separate the sequences. (RoPE is relative, so
        # a sequence at shifted positions gives the same logits.)
        batch["position_ids"] = torch.arange(21)[None]
        out_tables_only = ours(**batch).logits[0]
        dense = ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    alone = separate_logits(eager, batch["input_ids"], [lengths])[0]
    torch.testing.assert_close(out, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_tables_only, alone, atol=1e-4, rtol=1e-4)
    assert (dense[6:] - alone[6:]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------- contract
def test_registration_and_mask_function():
    name = fr_hf.ATTN_IMPLEMENTATION
    assert "flash" not in name.lower() and "/" not in name
    assert transformers.AttentionInterface()[name] is fr_hf.attention_forward
    assert transformers.AttentionMaskInterface()[name] is fr_hf.padding_mask
    full = torch.ones(2, 6, dtype=torch.bool)
    assert fr_hf.padding_mask(2, 6, 6, attention_mask=full) is None
    assert fr_hf.padding_mask(2, 6, 6, attention_mask=None) is None
    padded = full.clone()
    padded[0, 0] = False
    assert torch.equal(fr_hf.padding_mask(2, 6, 6, attention_mask=padded), padded)
    # A sliding layer's cache holds the last 4 keys: the padding is out of reach.
    assert fr_hf.padding_mask(2, 1, 4, q_offset=5, attention_mask=padded) is None
    # a static cache of 8 slots, 6 tokens: the 2 slots past them are unused whatever the mask says
    assert torch.equal(fr_hf.padding_mask(2, 1, 8, q_offset=5, attention_mask=full),
                       torch.tensor([[1] * 6 + [2] * 2] * 2, dtype=torch.int8))
    # no mask, a static cache of 8 slots holding 3 tokens before this one: keys [0, 4) are real, the rest unused
    slots = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2]] * 2, dtype=torch.int8)
    for offset in (3, torch.tensor(3)):
        assert torch.equal(fr_hf.padding_mask(2, 1, 8, q_offset=offset), slots)
    # with padding; a slot mask handed back (transformers turns the first call's result into bool) gives the same
    padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    want = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 2, 2, 2, 2]], dtype=torch.int8)
    first = fr_hf.padding_mask(2, 1, 8, q_offset=torch.tensor(3), attention_mask=padded)
    assert torch.equal(first, want)
    assert torch.equal(fr_hf.padding_mask(2, 1, 8, q_offset=torch.tensor(3), attention_mask=first.bool()), want)
    # what the attention makes of it in eager mode: the used slots' padding mask; None when nothing is padded
    assert torch.equal(fr_hf.used_slots(want, 8), padded)
    assert fr_hf.used_slots(torch.ones(2, 8, dtype=torch.int8), 8) is None
    assert fr_hf.padding_mask(2, 1, 8, q_offset=7) is None                       # every slot holds a token
    with pytest.raises(ValueError, match="flash"):
        fr_hf.register("my_flash_impl")


def test_errors(seed):
    cfg = make_config("gpt2")
    cfg.attn_pdrop = 0.1
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=fr_hf.ATTN_IMPLEMENTATION)
    ids = tokens(1, 5)
    with pytest.raises(NotImplementedError, match="dropout"):
        model.train()(input_ids=ids)
    assert model.eval()(input_ids=ids).logits.shape == (1, 5, VOCAB)   # eval mode: dropout 0, fine
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        fr_hf.attention_forward(torch.nn.Module(), q, k, k, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="sliding_window"):
        fr_hf.attention_forward(torch.nn.Module(), q, k, k, None, sliding_window=0)
    with pytest.raises(ValueError, match="cu_seq_lens_k"):
        fr_hf.attention_forward(torch.nn.Module(), q, k, k, None, cu_seq_lens_q=torch.tensor([0, 5]))
    holes = torch.tensor([[True, False, True, True, True]])
    with pytest.raises(NotImplementedError, match="sliding window"):      # training: no positions-keeping path
        fr_hf.attention_forward(torch.nn.Module(), q.clone().requires_grad_(), k, k, holes, sliding_window=2)
    # inference: the decode kernel with the holes as its key mask, positions (so the window) unchanged
    out, _ = fr_hf.attention_forward(torch.nn.Module(), q, k, k, holes, sliding_window=2)
    lower, upper = flash_bounds(5, 5, True, (1, 0))
    want = attention_ref(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), None, lower, upper,
                         mask=holes.view(1, 1, 1, 1, 5), dtype=None)[0]
    torch.testing.assert_close(out[:, holes[0]], want[:, holes[0]])
    # Without a window, padding between real tokens is simply skipped: equals attention over the real tokens.
    out, weights = fr_hf.attention_forward(torch.nn.Module(), q, k, k, holes)
    keep = holes[0]
    alone = flashring.flash_attn_func(q.transpose(1, 2)[:, keep], k.transpose(1, 2)[:, keep],
                                      k.transpose(1, 2)[:, keep], causal=True)
    assert weights is None and out.shape == (1, 5, 4, 8)
    torch.testing.assert_close(out[:, keep], alone)
    assert (out[:, ~keep] == 0).all()


def test_right_padding_inside_decode_shaped_calls(seed, torch_path):
    """Short calls go through decode_step even when they are not decoding: a right-padded 5-token prompt into a
    static cache, and a 3-token step over a dynamic cache whose last new token is padding in one row. The
    queries sit at the same positions in every row, so a row's padding after its tokens must not move them
    (a session-7 change that found the queries' end from each row's last token was wrong here and reverted)."""
    ours, eager, _ = make_models("llama")
    ours.eval(), eager.eval()
    ids, mask = tokens(2, 5), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        got, want = (m(input_ids=ids, attention_mask=mask, use_cache=True,
                       past_key_values=transformers.StaticCache(config=m.config, max_cache_len=24)).logits
                     for m in (ours, eager))
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    ids, mask = tokens(2, 9), torch.ones(2, 9, dtype=torch.long)
    mask[0, 8] = 0
    outs = []
    with torch.no_grad():
        for m in (ours, eager):
            cache = transformers.DynamicCache(config=m.config)
            m(input_ids=ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True)
            outs.append(m(input_ids=ids[:, 6:], attention_mask=mask, past_key_values=cache, use_cache=True).logits)
    real = mask[:, 6:].bool()
    torch.testing.assert_close(outs[0][real], outs[1][real], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- encoder-decoder
def make_bart():
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
                                     attention_dropout=0.0, activation_dropout=0.0, init_std=INIT, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=None, decoder_start_token_id=1,
                                     forced_eos_token_id=None)
    ours = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation=fr_hf.ATTN_IMPLEMENTATION)
    eager = copy.deepcopy(ours)
    eager.set_attn_implementation("eager")
    return ours.eval(), eager.eval()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_encoder_decoder_cross_attention_sees_every_encoder_token(cache, seed, torch_path):
    """Bart: bidirectional encoder, causal decoder, cross-attention from a few decoder tokens over a longer padded
    encoder output. The mask function must not treat cross-attention as a cache whose slots end at the decoder's
    length (found in review: the decoder attended only the first q_length encoder tokens)."""
    ours, eager = make_bart()
    ids = tokens(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0                   # right padding on the encoder side
    ids[1, 9:] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True, cache_implementation=cache)
    with torch.no_grad():
        want, got = eager.generate(ids, **kw), ours.generate(ids, **kw)
    assert got.sequences.shape == want.sequences.shape == (2, 6)      # decoder start token + 5
    for step, (g, w) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    assert torch.equal(got.sequences, want.sequences)
    with torch.no_grad():            # teacher-forced: all decoder positions at once, gradients off
        dec = tokens(2, 4)
        want = eager(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_compiled_forward_with_a_padding_mask(name, seed, torch_path):
    """torch.compile(fullgraph=True) over an inference forward with a 2-D padding mask (all ones, and left-padded):
    the traced mask reaches the decode path (key mask, no host read) and the real tokens' logits match eager."""
    torch._dynamo.reset()
    ours, eager, _ = make_models(name)
    ours.eval(), eager.eval()
    fwd = torch.compile(ours.forward, fullgraph=True, backend="aot_eager")
    ids = tokens(2, 11)
    for pad in (0, 5):
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        with torch.no_grad():
            got = fwd(input_ids=ids, attention_mask=mask).logits
            want = eager(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)

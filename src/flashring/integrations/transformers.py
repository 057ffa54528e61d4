"""flashring as a Hugging Face transformers attention implementation.

Importing this module registers :func:`attention_forward` (and its mask function :func:`padding_mask`) under
:data:`ATTN_IMPLEMENTATION`::

    import flashring.integrations.transformers as fr_hf
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=fr_hf.ATTN_IMPLEMENTATION)
    model.set_attn_implementation(fr_hf.ATTN_IMPLEMENTATION)   # or switch an existing model

What each call becomes (no ``seqlen x seqlen`` mask is ever built):

* no padding: :func:`flashring.flash_attn_func` (causal, sliding window, softcap, GQA without repeating K/V);
* a padded batch (the model receives a 2-D ``(batch, seqlen_k)`` bool mask, True = real token): the real tokens are
  gathered into a packed batch and :func:`flashring.flash_attn_varlen_func` runs on them, no work on padding.
  Padding *query* rows output zeros, as in transformers' own flash-attention path (unpad / pad); eager gives them
  attention over the real keys before them, so logits at padding positions differ from eager's (losses mask them);
* packed sequences, i.e. ``position_ids`` that restart inside a row (any batch size), or explicit
  ``cu_seq_lens_q/k`` + ``max_length_q/k`` keyword arguments (``DataCollatorWithFlattening``): varlen as well;
* a decode step (few queries against a longer K/V cache): :func:`decode_step`, its own function so that a dedicated
  decode kernel slots in there; it uses ``flashring.flash_attn_with_kvcache`` when flashring provides one.

Attention dropout is not implemented (``NotImplementedError``: set the model's attention dropout to 0 or call
``model.eval()``). Tensors are passed through in their dtype (fp16 / bf16 / fp32; flashring applies autocast).

A static cache (and a sliding one not yet full) hands the attention every slot. The mask function then returns an
int8 *slot mask* as long as the cache (:func:`slot_mask`: real token / padding / unused slot past the queries), the
same shape at every step, so compiled generation (``torch.compile(fullgraph=True)``, CUDA graphs) records one graph;
traced calls find the queries' end and each row's first key in it on the device. Padding *between* a row's real
tokens (a right-padded prompt followed by generated tokens, or pad tokens inside a prompt) reaches the decode kernel
as a key mask (``flash_attn_with_kvcache``'s ``key_padding_mask``), traced or not.

Not covered: custom 4-D attention masks (``NotImplementedError``); patterns that transformers expresses only inside
its mask functions (bidirectional image-token blocks, chunked attention): this implementation sees causal, the
sliding window and padding only.
"""
from __future__ import annotations

import weakref
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

import flashring

# transformers treats any implementation name containing "flash" as a request for its hub flash-attn kernels (and
# fails to load them), and one containing "/" as a hub repository, so the name avoids both.
ATTN_IMPLEMENTATION = "fring"

# A call with at most this many queries against a longer K/V (a cache) is a decode step, served by decode_step.
DECODE_MAX_Q = 16

# A cache with unused slots (transformers' StaticCache: all its slots reach the attention, the ones past the tokens
# seen so far empty) gets a mask as long as the cache, the same shape at every step, so that compiled generation
# records one CUDA graph (a mask that grows per step records one per step: 0.13x sdpa at 1 x 4k, session 7). Its
# int8 values: 1 a real token, 0 padding, UNUSED_SLOT a slot past the queries' end. The end (q_offset + q_length,
# the same in every row) travels in the mask because the padding cannot tell it: a row's last query may be padding.
UNUSED_SLOT = 2


# ------------------------------------------------------------------------------------------------- index tables
class Packing(NamedTuple):
    """Where the real tokens of a ``(batch, seqlen)`` layout are, as the varlen functions want them."""
    index: Optional[torch.Tensor]   # flat positions in batch * seqlen of the kept tokens, in order; None = all
    cu_seqlens: torch.Tensor        # int32 (nseq + 1,)
    max_seqlen: int
    holes: bool                     # some sequence's tokens are not contiguous (padding between real tokens)


class _Memo:
    """Index tables keyed by the identity of the tensor they were derived from.

    transformers builds the padding mask and the position_ids once per forward and hands the same tensor objects to
    every layer; remembering the tables built from them spares each later layer the host synchronisations
    (``nonzero``, ``max().item()``). A weak reference plus the tensor's version counter make a stale hit
    impossible: a freed tensor never matches, an in-place edit bumps the version."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: List[tuple] = []

    def get(self, tensor: torch.Tensor, key: tuple, build: Callable[[], object]):
        if torch.compiler.is_compiling():
            return build()
        # Inference-mode tensors have no version counter; they cannot be edited outside inference mode either.
        version = -1 if tensor.is_inference() else tensor._version
        for ref, k, v, value in self.entries:
            if ref() is tensor and k == key and v == version:
                return value
        value = build()
        self.entries = [e for e in self.entries if e[0]() is not None][-(self.size - 1):]
        self.entries.append((weakref.ref(tensor), key, version, value))
        return value


_MEMO = _Memo()


def slot_mask(batch: int, q_length: int, kv_length: int, q_offset, attention_mask: Optional[torch.Tensor],
              device=None) -> torch.Tensor:
    """The int8 ``(batch, kv_length)`` slot mask (see :data:`UNUSED_SLOT`) of queries at ``[q_offset, q_offset +
    q_length)`` (q_offset an int or a 0-dim tensor: no host read) over a padding mask covering slots ``[0, L)``."""
    if isinstance(q_offset, torch.Tensor):
        device = q_offset.device
    elif attention_mask is not None:
        device = attention_mask.device
    used = torch.arange(kv_length, device=device) < q_offset + q_length
    if attention_mask is None:
        real = used.expand(batch, kv_length)
    else:
        known = attention_mask[:, :kv_length].to(device=device, dtype=torch.bool)
        real = F.pad(known, (0, kv_length - known.shape[1]), value=False) & used
    return torch.where(used, real.to(torch.int8), UNUSED_SLOT)


def used_slots(mask: torch.Tensor, seqlen_k: int) -> Optional[torch.Tensor]:
    """Eager calls: a :func:`slot_mask` as the ``(batch, end)`` bool padding mask of its used slots, None when every
    slot holds a real token (one host read per mask; transformers hands every layer the same one)."""
    def build():
        end = int((mask[0] != UNUSED_SLOT).sum())
        real = mask[:, :end] == 1
        return None if end == seqlen_k and bool(real.all()) else real
    return _MEMO.get(mask, ("slots", seqlen_k), build)


def _cu_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def packing_from_mask(mask: torch.Tensor) -> Packing:
    """Packing of the True entries of a ``(batch, seqlen)`` bool mask, one sequence per row."""
    b, s = mask.shape
    lengths = mask.sum(1, dtype=torch.int32)
    index = mask.reshape(-1).nonzero().reshape(-1)
    # A row is contiguous when its first and last real token are lengths - 1 apart (an empty row trivially is).
    pos = torch.arange(s, device=mask.device)
    first = torch.where(mask, pos, s).amin(1)
    last = torch.where(mask, pos, -1).amax(1)
    holes = bool(((lengths > 0) & (last - first + 1 != lengths)).any())
    return Packing(index, _cu_from_lengths(lengths), int(lengths.max()), holes)


def packing_from_position_ids(position_ids: torch.Tensor, batch: int, seqlen: int) -> Optional[Packing]:
    """Sequences packed into rows, marked by ``position_ids`` ``(batch or 1, seqlen)``: a sequence starts at each
    row start and wherever the position is not the previous one + 1 (a restart). None when every row holds exactly
    one sequence (nothing is packed)."""
    pos = position_ids.expand(batch, seqlen)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    flat = starts.reshape(-1).nonzero().reshape(-1)
    if flat.numel() == batch:
        return None
    cu = torch.cat([flat, flat.new_full((1,), batch * seqlen)]).to(torch.int32)
    return Packing(None, cu, int((cu[1:] - cu[:-1]).max()), False)


def left_padding(mask: torch.Tensor) -> Tuple[bool, Optional[torch.Tensor]]:
    """``(pure, lead)``: whether ``mask`` is pure left padding (every row: False... then True...), and then the int32
    ``(batch,)`` count of leading padding tokens, None when no row has any."""
    lead = mask.shape[1] - mask.sum(1, dtype=torch.int32)
    pure = bool((mask == (torch.arange(mask.shape[1], device=mask.device) >= lead[:, None])).all())
    return pure, (lead if pure and bool(lead.any()) else None)


def _gather(x: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, S, H, D) -> packed (total, H, D)."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat if index is None else flat.index_select(0, index)


def _scatter(out: torch.Tensor, index: Optional[torch.Tensor], batch: int, seqlen: int) -> torch.Tensor:
    """Packed (total, H, D) -> (B, S, H, D); positions with no query (padding) get zeros."""
    if index is not None:
        out = out.new_zeros(batch * seqlen, *out.shape[1:]).index_copy(0, index, out)
    return out.reshape(batch, seqlen, *out.shape[1:])


# ------------------------------------------------------------------------------------------------- code paths
def varlen_attention(q, k, v, pq: Packing, pk: Packing, *, softmax_scale, causal, window_size, softcap):
    """(B, Sq, H, D) attention restricted to the tokens (and sequence boundaries) described by pq / pk."""
    if window_size != (-1, -1) and (pq.holes or pk.holes):
        # The window counts positions; packing away padding between real tokens would shorten distances.
        raise NotImplementedError("attention_mask has padding between real tokens, which flashring cannot combine "
                                  "with a sliding window; use left or right padding")
    out = flashring.flash_attn_varlen_func(
        _gather(q, pq.index), _gather(k, pk.index), _gather(v, pk.index), pq.cu_seqlens, pk.cu_seqlens,
        pq.max_seqlen, pk.max_seqlen, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap)
    return _scatter(out, pq.index, q.shape[0], q.shape[1])


def padded_attention(q, k, v, mask: torch.Tensor, **opts):
    """Attention over a padded batch: ``mask`` ``(B, L)`` bool, True = real token, covering the keys' first L
    positions (L < Sk: a static cache whose later slots are unused) and, when causal, the queries as its last Sq
    positions; or a :func:`slot_mask` (traced calls), the queries ending where its used slots end. Non-causal
    queries (cross-attention) all count: the mask is about keys there."""
    b, sq = q.shape[:2]
    sk, length = k.shape[1], mask.shape[1]
    if mask.dtype == torch.int8:
        real = mask == 1
        end = (mask != UNUSED_SLOT).sum(1, keepdim=True)
        pk = packing_from_mask(real)
        pq = packing_from_mask(real.gather(1, (end - sq + torch.arange(sq, device=mask.device)).clamp(min=0)))
    else:
        pk = _MEMO.get(mask, ("k", sk), lambda: packing_from_mask(F.pad(mask, (0, sk - length), value=False)))
        kvcache = getattr(flashring, "flash_attn_with_kvcache", None)
        if (pk.holes and opts["causal"] and opts["window_size"] != (-1, -1) and kvcache is not None
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))):
            # packing would shorten the window's distances; the decode kernel keeps positions (inference only)
            return kvcache(q, k, v, cache_seqlens=length, **opts, key_padding_mask=F.pad(
                mask, (0, sk - length), value=False))
        pq = pk if sq == sk == length else _MEMO.get(mask, ("q", sq), lambda: packing_from_mask(mask[:, -sq:]))
    if not opts["causal"]:
        pq = Packing(None, _cu_from_lengths(torch.full((b,), sq, dtype=torch.int32, device=q.device)), sq, False)
    return varlen_attention(q, k, v, pq, pk, **opts)


def traced_key_range(mask: torch.Tensor, seqlen_k: int) -> dict:
    """``flash_attn_with_kvcache``'s key arguments for a decode step, from a padding mask without a host read
    (traced calls): the queries end where a :func:`slot_mask`'s used slots end (a bool mask: at its length), each
    row's keys start at its first real token, and the padding in between is the key mask."""
    keys = torch.arange(mask.shape[1], device=mask.device)
    if mask.dtype == torch.int8:
        end = (mask != UNUSED_SLOT).sum(1, dtype=torch.int32)
        real = mask == 1
    else:
        end = torch.full((mask.shape[0],), mask.shape[1], dtype=torch.int32, device=mask.device)
        real = mask
    lead = torch.minimum(torch.where(real, keys, mask.shape[1]).amin(1).to(torch.int32), end)
    return dict(cache_seqlens=end, cache_leftpad=lead,
                key_padding_mask=F.pad(real, (0, seqlen_k - mask.shape[1]), value=False))


def decode_step(q, k, v, mask: Optional[torch.Tensor], *, softmax_scale, causal, window_size, softcap):
    """A few new queries ``(B, Sq, H, D)`` against the whole K/V cache ``(B, Sk, Hk, D)``, Sk > Sq; the queries are
    the cache's last positions (bottom-right causal). ``mask``: None, the ``(B, L)`` bool padding mask (L <= Sk), or
    (traced calls) a :func:`slot_mask`.

    Without gradients: flashring's decode kernel, ``flash_attn_with_kvcache`` (split-KV, GQA packing), each row's
    keys ``[leftpad, end)``, and padding between a row's real tokens (a right-padded prompt followed by generated
    tokens, pad tokens inside a prompt) as its ``key_padding_mask``. With gradients: the general paths (looked up
    at call time, so the tests can run both)."""
    opts = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap)
    kvcache = getattr(flashring, "flash_attn_with_kvcache", None)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if kvcache is not None and not needs_grad:
        if mask is None:
            return kvcache(q, k, v, cache_seqlens=k.shape[1], **opts)           # an int: no per-step tensor
        if torch.compiler.is_compiling():
            return kvcache(q, k, v, **traced_key_range(mask, k.shape[1]), **opts)
        pure, leftpad = _MEMO.get(mask, ("leftpad",), lambda: left_padding(mask))
        if pure:
            extra = {} if leftpad is None else dict(cache_leftpad=leftpad)
        else:
            extra = dict(key_padding_mask=_MEMO.get(mask, ("keys", k.shape[1]), lambda: F.pad(
                mask, (0, k.shape[1] - mask.shape[1]), value=False)))
        return kvcache(q, k, v, cache_seqlens=mask.shape[1], **extra, **opts)
    if mask is None:
        return flashring.flash_attn_func(q, k, v, **opts)
    return padded_attention(q, k, v, mask, **opts)


# ------------------------------------------------------------------------------------------------- entry points
def _prepare_mask(attention_mask, batch: int, seqlen_q: int, seqlen_k: int) -> Optional[torch.Tensor]:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise NotImplementedError(
            f"attention_mask must be None or a 2-D (batch, seqlen_k) padding mask for attn_implementation="
            f"{ATTN_IMPLEMENTATION!r}, got {shape}; custom 4-D masks are not supported (flashring builds no "
            f"seqlen x seqlen mask)")
    if attention_mask.dtype == torch.int8:
        if attention_mask.shape != (batch, seqlen_k):
            raise ValueError(f"a slot mask (int8 attention_mask) has shape {tuple(attention_mask.shape)}, expected "
                             f"({batch}, {seqlen_k}), one entry per cache slot")
        return attention_mask if torch.compiler.is_compiling() else used_slots(attention_mask, seqlen_k)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask != 0
    if attention_mask.shape[1] > seqlen_k:
        # Sliding-window caches keep only the last seqlen_k keys.
        attention_mask = attention_mask[:, -seqlen_k:]
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < seqlen_q:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, L) with "
                         f"{seqlen_q} <= L <= {seqlen_k} (query length {seqlen_q}, key length {seqlen_k})")
    return attention_mask


def _window(sliding_window, causal: bool) -> Tuple[int, int]:
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    if not causal:
        raise NotImplementedError("sliding_window with non-causal attention is not supported by "
                                  f"attn_implementation={ATTN_IMPLEMENTATION!r}")
    # transformers' window W: query i sees keys j with i - W < j <= i, i.e. W - 1 keys to the left.
    return (sliding_window - 1, 0)


def _explicit_packing(kwargs, total_q: int, total_k: int, device: torch.device):
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    cu_q, cu_k, max_q, max_k = (kwargs.get(n) for n in names)
    if (cu_q is None) != (cu_k is None):
        missing = "cu_seq_lens_k" if cu_k is None else "cu_seq_lens_q"
        raise ValueError(f"{missing} is missing: pass cu_seq_lens_q and cu_seq_lens_k together")
    packs = []
    for cu, longest in ((cu_q, max_q), (cu_k, max_k)):
        cu = cu.to(device=device, dtype=torch.int32)   # collators build them on the CPU
        if longest is None:
            longest = int((cu[1:] - cu[:-1]).max())
        packs.append(Packing(None, cu, int(longest), False))
    if int(packs[0].cu_seqlens[-1]) != total_q or int(packs[1].cu_seqlens[-1]) != total_k:
        raise ValueError(f"cu_seq_lens_q / cu_seq_lens_k end at {int(packs[0].cu_seqlens[-1])} / "
                         f"{int(packs[1].cu_seqlens[-1])} but the batch holds {total_q} / {total_k} tokens")
    return packs


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      position_ids: Optional[torch.Tensor] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query ``(B, H, Sq, D)``, key / value ``(B, Hk, Sk, D)`` (GQA
    heads not repeated), ``attention_mask`` from :func:`padding_mask`. Returns ``(out (B, Sq, H, D), None)``: no
    attention weights exist to return."""
    if dropout:
        raise NotImplementedError(
            f"dropout={dropout}: attention dropout is not implemented by attn_implementation="
            f"{ATTN_IMPLEMENTATION!r}; set the model's attention dropout to 0 (e.g. attention_dropout / attn_pdrop "
            "in the config) or call model.eval()")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("s_aux (attention sinks) is not supported by "
                                  f"attn_implementation={ATTN_IMPLEMENTATION!r}")
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    opts = dict(softmax_scale=scaling, causal=causal, window_size=_window(sliding_window, causal),
                softcap=float(softcap or 0.0))

    # (B, H, S, D) -> flash-attn's (B, S, H, D), as strided views.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    mask = _prepare_mask(attention_mask, b, sq, sk)

    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        if mask is not None:
            raise ValueError("pass either cu_seq_lens_q/k (packed sequences) or an attention_mask with padding, "
                             "not both")
        pq, pk = _explicit_packing(kwargs, b * sq, b * sk, q.device)
        out = varlen_attention(q, k, v, pq, pk, **opts)
    elif sq < sk and sq <= DECODE_MAX_Q or (mask is not None and sq <= sk and (
            mask.dtype == torch.int8 or torch.compiler.is_compiling())):
        # (traced calls with a mask: a slot mask -- a cache's unused slots, any query count, a prefill filling the
        # whole cache too -- or a padding mask; one graph, no host read; with grad decode_step takes the padded
        # path)
        out = decode_step(q, k, v, mask, **opts)
    elif mask is not None:
        out = padded_attention(q, k, v, mask, **opts)
    else:
        # Packing is only inferred for self-attention over fresh tokens: with a cache (Sq != Sk) position_ids
        # continue from the cache, and with padding (mask present) they are not an arange.
        packed = None
        if position_ids is not None and sq == sk and position_ids.dim() == 2 and position_ids.shape[-1] == sq:
            packed = _MEMO.get(position_ids, ("pos", b), lambda: packing_from_position_ids(position_ids, b, sq))
        if packed is not None:
            out = varlen_attention(q, k, v, packed, packed, **opts)
        else:
            # Sk > Sq without a mask (a longer cache): bottom-right causal, the queries are the newest tokens.
            out = flashring.flash_attn_func(q, k, v, **opts)
    return out, None


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask: Optional[torch.Tensor] = None, **kwargs) -> Optional[torch.Tensor]:
    """transformers' mask-function contract. flashring needs no ``seqlen x seqlen`` mask: causality and windows
    are kernel arguments, so this returns only the 2-D ``(batch, <= kv_length)`` bool padding mask (True = real
    token), None when nothing is padded, or, when the cache has slots past the queries (a static cache; q_offset a
    0-dim tensor there, never read on the host), the int8 :func:`slot_mask`. Without this registration transformers
    would hand the attention function no mask at all and padding would be silently attended to."""
    if attention_mask is not None and attention_mask.dim() != 2:
        return attention_mask     # attention_forward rejects it with a clear message
    # Bidirectional calls (an encoder, a decoder's cross-attention over the encoder's states) see every key: their
    # queries end nowhere in the keys, so only padding matters (a slot mask would hide the keys past q_length).
    bidirectional = "allow_is_bidirectional_skip" in kwargs
    end = q_offset + q_length
    if not bidirectional and (isinstance(q_offset, torch.Tensor) or end < kv_length):   # slots past `end`: no token
        return slot_mask(batch_size, q_length, kv_length, q_offset, attention_mask, kwargs.get("device"))
    if attention_mask is None:
        return None
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    if mask.shape[1] > kv_length:
        mask = mask[:, -kv_length:]
    # Kept when shorter than the keys even if all True: the keys past it are not tokens.
    # (not when traced: a host read. A traced all-True mask then takes the masked paths: exact, and read-free
    # where the decode path serves it -- no grad, sq <= sk; a traced padded prefill with grad still reads it)
    if mask.shape[1] == kv_length and not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention and mask functions under ``name`` (done for :data:`ATTN_IMPLEMENTATION` on import)."""
    if "flash" in name or "/" in name:
        raise ValueError(f"name {name!r}: transformers reserves names containing 'flash' or '/' for its hub "
                         "kernels; choose another")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    return name


register()

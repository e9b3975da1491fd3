"""Packed-row attention without a T×T mask: "sdpa_packed", a transformers attention implementation.

With stock SDPA, transformers turns position ids that restart (packed documents) into a dense
block-diagonal boolean mask of `[B, 1, T, T]` per forward (`masking_utils.create_causal_mask`):
1 GiB at T = 32K per row, 16 GiB at 128K, and SDPA with an explicit mask cannot use its fused
causal kernels. This module registers, through transformers' public extension points,

- an attention mask function (`AttentionMaskInterface`) that returns no mask where the mask would
  only be "causal, inside each packed document" at every real token (no cache offset, no custom
  overlay, no padding or right padding only), and the stock `sdpa_mask` everywhere else (left
  padding, KV-cache decoding, overlays, unverified families);
- an attention function (`AttentionInterface`) that, given no mask, finds the documents of each row
  from its `position_ids` -- a new document wherever the id does not go up by exactly 1, the rule of
  `masking_utils.find_packed_sequence_indices` that builds the stock mask (for rows from
  `data.pack_rows` this is "wherever it restarts at 0", flash-attn's varlen rule) -- and runs
  `scaled_dot_product_attention(is_causal=True)` on each document's slice, concatenating the outputs.
  If all rows share one segmentation they are batched, else each row runs on its own; a row of one
  document is one call, as stock. Given a dense mask (left padding, a cache) it is exactly stock
  `sdpa_attention_forward`.

So it computes what stock SDPA computes (outputs and gradients, tested to 1e-5 in float32) while
holding only O(T) extra memory. (In a right-padded batch the outputs at padded positions, which
attend causally to the padding before them, differ from stock's; those at real tokens do not.)
Sliding windows (Mistral/Qwen2/Phi-3/Starcoder2/Gemma-3 `sliding_window`) are honoured exactly: a
document longer than the window is attended in query blocks of at most `SLIDING_BLOCK` tokens
against the keys of their band, with a small `[block, block + window - 1]` mask. Attention-logit soft-capping (Gemma-2) cannot be expressed in
SDPA and is refused, as stock SDPA refuses it; chunked attention (Llama-4) is not supported.

Generation and any forward with `use_cache=True` keep working: with a cache transformers does not
treat restarting position ids as documents, and neither does this (the prefill runs as one causal
sequence, decoding steps get stock SDPA with the mask transformers builds).

    from gqa_convert.train.attention import register, supports_packed_attention
    register()  # idempotent; then attn_implementation="sdpa_packed"
    ok, why = supports_packed_attention(model_or_config)
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F

NAME = "sdpa_packed"

# Text-LM families whose modeling code was read for this (transformers 5.x) and is tested in
# tests/test_packed_attention.py: they build their masks with masking_utils.create_causal_mask /
# create_sliding_window_causal_mask, call the attention through AttentionInterface with
# `position_ids` in its kwargs, and pass `sliding_window=` to it wherever their mask has a window.
# Other families still run under "sdpa_packed", but get the stock dense mask (correct, not bounded).
FAMILIES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "olmo2", "starcoder2",
    "stablelm", "granite", "cohere",
})  # fmt: skip

# The largest query block of a sliding-window document: its mask is [block, block + window - 1].
SLIDING_BLOCK = 1024


class PackedAttentionError(ValueError):
    """A model feature this attention cannot compute (soft-capping, attention sinks, odd position ids)."""


# ----------------------------------------------------------------------------- registration


def register() -> str:
    """Register "sdpa_packed" with transformers (attention and mask interfaces); idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)
    return NAME


def is_registered() -> bool:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return (AttentionInterface._global_mapping.get(NAME) is packed_sdpa_attention
            and AttentionMaskInterface._global_mapping.get(NAME) is packed_sdpa_mask)  # fmt: skip


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def supports_packed_attention(model_or_config) -> tuple[bool, str]:
    """(usable, why not): whether "sdpa_packed" computes this model's packed attention without a T×T mask.

    Accepts a model (also peft/DDP-wrapped) or a config. False for soft-capped attention (Gemma-2),
    chunked or bidirectional attention, a model class without SDPA support, and families not in
    `FAMILIES` (for those it would fall back to the stock dense mask).
    """
    model = model_or_config
    for attr in ("module", "base_model", "model"):  # DDP, peft wrappers: find the PreTrainedModel
        if hasattr(model, "config") and hasattr(model, "_supports_sdpa"):
            break
        model = getattr(model, attr, model)
    config = getattr(model, "config", model_or_config)
    cfg = _text_config(config)
    kind = getattr(cfg, "model_type", None)
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return False, (f"{kind} soft-caps its attention logits (attn_logit_softcapping), which SDPA cannot apply; "
                       "use flash-attn or eager attention")  # fmt: skip
    if getattr(cfg, "attention_chunk_size", None) is not None:
        return False, f"{kind} uses chunked attention (attention_chunk_size), which sdpa_packed does not implement"
    if not getattr(cfg, "is_causal", True) or getattr(cfg, "use_bidirectional_attention", False):
        return False, f"{kind} is configured for bidirectional attention; sdpa_packed is for causal LMs"
    if hasattr(model, "_supports_sdpa") and not model._supports_sdpa:
        return False, f"{type(model).__name__} does not support SDPA in transformers"
    if kind not in FAMILIES:
        return False, (f"model type {kind!r} is not among the families verified for sdpa_packed "
                       f"({', '.join(sorted(FAMILIES))}); it would get the stock dense mask")  # fmt: skip
    return True, ""


# ----------------------------------------------------------------------------- the mask function


def _right_padded(attention_mask: torch.Tensor, kv_length: int) -> bool:
    """Whether every row of a 2-D padding mask is its tokens then only padding (ones, then zeros)."""
    if attention_mask.ndim != 2 or attention_mask.shape[-1] != kv_length:
        return False
    mask = attention_mask.bool()
    return bool((mask[:, :-1] | ~mask[:, 1:]).all())


def _mask_free(q_length, kv_length, q_offset, kv_offset, attention_mask, use_vmap, config, kwargs) -> bool:
    """Whether the stock mask would be "causal (windowed) inside each packed document" at every real token."""
    if use_vmap or config is None:  # or/and overlays (image tokens, bidirectional windows)
        return False
    if "allow_is_bidirectional_skip" in kwargs or not getattr(config, "is_causal", True):  # a bidirectional mask
        return False
    if not isinstance(q_offset, int) or not isinstance(kv_offset, int) or q_offset != 0 or kv_offset != 0:
        return False
    if q_length != kv_length or q_length <= 1:
        return False
    cfg = _text_config(config)
    if getattr(cfg, "model_type", None) not in FAMILIES or getattr(cfg, "attention_chunk_size", None) is not None:
        return False
    # Right padding changes nothing at the real tokens of a causal mask (their keys all precede the
    # padding); only the outputs at padded positions differ from stock, which nothing reads.
    return attention_mask is None or _right_padded(attention_mask, kv_length)


def packed_sdpa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    local_size: Optional[int] = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    config=None,
    **kwargs,
) -> Optional[torch.Tensor]:
    """No mask where `packed_sdpa_attention` derives it from position ids; else the stock SDPA mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if _mask_free(q_length, kv_length, q_offset, kv_offset, attention_mask, use_vmap, config, kwargs):
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=causal_mask_function if mask_function is None else mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip,
        use_vmap=use_vmap,
        config=config,
        **kwargs,
    )


# ----------------------------------------------------------------------------- segments


def document_starts(position_ids: torch.Tensor, batch_size: int, length: Optional[int] = None) -> list[tuple[int, ...]]:
    """Start index of every document of each row: 0, and wherever the position id does not go up by 1."""
    length = position_ids.shape[-1] if length is None else length
    if position_ids.ndim != 2:
        raise PackedAttentionError(
            f"sdpa_packed needs 2-D position_ids [batch, tokens], got shape {tuple(position_ids.shape)} "
            "(multi-axis rotary position ids are not supported); use attn_implementation='sdpa'"
        )
    if position_ids.shape[-1] != length:
        raise PackedAttentionError(
            f"sdpa_packed got position_ids for {position_ids.shape[-1]} tokens but attends over {length}; "
            "pass one position id per input token"
        )
    pos = position_ids.expand(batch_size, -1) if position_ids.shape[0] != batch_size else position_ids
    new = torch.diff(pos, dim=-1) != 1
    starts: list[list[int]] = [[0] for _ in range(batch_size)]
    for b, t in torch.nonzero(new).tolist():  # one device sync per forward (cached across layers)
        starts[b].append(t + 1)
    return [tuple(s) for s in starts]


_last: tuple = (None, -1, 0, None)  # (weakref to position_ids, its _version, batch, starts)


def _cached_starts(position_ids: torch.Tensor, batch_size: int, length: int) -> list[tuple[int, ...]]:
    """`document_starts`, computed once per forward: every layer gets the same position_ids tensor."""
    global _last
    ref, version, batch, starts = _last
    if ref is not None and ref() is position_ids and version == position_ids._version and batch == batch_size:
        return starts
    starts = document_starts(position_ids, batch_size, length)
    try:
        _last = (weakref.ref(position_ids), position_ids._version, batch_size, starts)
    except TypeError:  # a tensor subclass without weakref support: no caching
        pass
    return starts


# ----------------------------------------------------------------------------- attention


def _sdpa_kwargs(key: torch.Tensor, value: torch.Tensor, n_rep: int) -> dict:
    """enable_gqa where transformers' stock SDPA uses it for a mask-free call (same kernel choice as stock)."""
    from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

    return {"enable_gqa": True} if n_rep > 1 and use_gqa_in_sdpa(None, key, value) else {}


def _causal(q, k, v, *, scale, dropout, n_rep) -> torch.Tensor:
    """Causal attention of one document (q, k, v: [b, heads, L, d])."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, is_causal=q.shape[2] > 1,
                                          **_sdpa_kwargs(k, v, n_rep))  # fmt: skip


def _banded(q, k, v, *, window: int, scale, dropout, n_rep) -> torch.Tensor:
    """Causal attention of one document longer than the window: key j is seen by query i iff i - window < j <= i
    (masking_utils.sliding_window_overlay), in query blocks against the keys of their band."""
    from transformers.integrations.sdpa_attention import repeat_kv

    if n_rep > 1:  # with an explicit mask stock SDPA repeats the KV heads too
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    length = q.shape[2]
    block = max(1, min(SLIDING_BLOCK, (window + 1) // 2))  # mask <= block x (block + window - 1) < window^2
    outs = []
    for qs in range(0, length, block):
        qe = min(qs + block, length)
        ks = max(0, qs - window + 1)
        qi = torch.arange(qs, qe, device=q.device)[:, None]
        ki = torch.arange(ks, qe, device=q.device)[None, :]
        allowed = (ki <= qi) & (ki > qi - window)
        outs.append(F.scaled_dot_product_attention(q[:, :, qs:qe], k[:, :, ks:qe], v[:, :, ks:qe], attn_mask=allowed,
                                                   dropout_p=dropout, scale=scale))  # fmt: skip
    return torch.cat(outs, dim=2)


def _rows(q, k, v, starts: tuple[int, ...], *, window, scale, dropout, n_rep) -> torch.Tensor:
    """Attention of rows sharing one segmentation: each document on its own, outputs concatenated."""
    length = q.shape[2]
    bounds = list(zip(starts, (*starts[1:], length)))
    pieces = []
    for s, e in bounds:
        qs, ks, vs = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        if window is not None and e - s > window:
            pieces.append(_banded(qs, ks, vs, window=window, scale=scale, dropout=dropout, n_rep=n_rep))
        else:
            pieces.append(_causal(qs, ks, vs, scale=scale, dropout=dropout, n_rep=n_rep))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function: query [B, H, T, d], key/value [B, H_kv, T, d] -> ([B, T, H, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("softcap") is not None:
        raise PackedAttentionError(
            f"sdpa_packed cannot soft-cap attention logits (softcap={kwargs['softcap']}, e.g. Gemma-2's "
            "attn_logit_softcapping); use attn_implementation='flash_attention_2' or 'eager' for this model"
        )
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise PackedAttentionError("sdpa_packed does not support attention sinks; use attn_implementation='eager'")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_length, kv_length = query.shape[2], key.shape[2]
    if (
        attention_mask is not None
        or not causal
        or q_length != kv_length
        or q_length <= 1
        or kwargs.get("position_bias") is not None
    ):
        # padding, a cache, a custom overlay or a non-causal module: exactly stock SDPA with transformers' mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip

    batch = query.shape[0]
    n_rep = query.shape[1] // key.shape[1]
    window = kwargs.get("sliding_window")
    window = window if isinstance(window, int) and 0 < window < q_length else None
    position_ids = kwargs.get("position_ids")
    if position_ids is None or kwargs.get("use_cache"):
        # with a cache (generation) transformers never reads documents from position ids; neither do we
        starts: list[tuple[int, ...]] = [(0,)] * batch
    else:
        starts = _cached_starts(position_ids, batch, q_length)
    opts = dict(window=window, scale=scaling, dropout=dropout, n_rep=n_rep)
    if key.shape[0] != batch:  # broadcast K/V (not seen in causal LMs, but keep SDPA's semantics)
        key, value = key.expand(batch, *key.shape[1:]), value.expand(batch, *value.shape[1:])
    if all(s == starts[0] for s in starts):
        out = _rows(query, key, value, starts[0], **opts)
    else:
        out = torch.cat([_rows(query[b : b + 1], key[b : b + 1], value[b : b + 1], starts[b], **opts)
                         for b in range(batch)], dim=0)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None

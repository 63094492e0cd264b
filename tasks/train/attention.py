"""Attention that stays inside each packed example without building a dense mask.

With packing, a row holds several examples and position ids restart at each of them.
transformers' default for that (`train.attention: mask`) is a 4D block-diagonal mask fed
to SDPA: correct, but the kernel then computes the whole `seq_len x seq_len` square of
every row and cannot skip the blocks the mask removes. `train.attention: packed` (what
`auto`, the default, picks wherever it is exact) registers an attention function that reads the example boundaries from the
position ids and computes only causal attention within each example:

- on CUDA, one call of flash varlen attention (`torch.nn.attention.varlen.varlen_attn`)
  over the flattened rows;
- elsewhere (and where varlen is missing), causal SDPA per example, which skips the upper
  triangle and every cross-example block.

The boundaries are computed once per forward pass by a pre-hook on the decoder and handed
to every layer as a keyword argument, not recomputed per layer.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

PACKED = "ftllm_packed"
_BOUNDS = "ftllm_example_bounds"  # the keyword the decoder passes down to each attention call
_VARLEN_KW: dict = {}  # the causal flag of this torch's varlen_attn, found once at registration


def example_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """Start offsets of the examples in the flattened (batch * width) rows, plus the total, as int32.

    An example starts wherever the position id is 0. Every row starts with one, so no
    example crosses from one row into the next.
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=False).reshape(-1)
    total = torch.tensor([flat.numel()], device=flat.device, dtype=starts.dtype)
    return torch.cat([starts, total]).to(torch.int32)


def _varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: causal attention within each packed example.

    query/key/value arrive as (batch, heads, width, head_dim); the output goes back as
    (batch, width, heads, head_dim), as transformers' own attention functions return it.
    """
    b, h, n, d = query.shape
    bounds = kwargs.get(_BOUNDS)
    if bounds is None:
        bounds = example_bounds(kwargs["position_ids"].expand(b, -1))
    if key.shape[1] != h:  # grouped-query attention: repeat the key/value heads
        key = key.repeat_interleave(h // key.shape[1], dim=1)
        value = value.repeat_interleave(h // value.shape[1], dim=1)
    q, k, v = (t.transpose(1, 2).reshape(b * n, h, d) for t in (query, key, value))
    p = dropout if module.training else 0.0
    if q.device.type == "cuda" and _VARLEN_KW and p == 0.0:
        from torch.nn.attention.varlen import varlen_attn

        extra = {**_VARLEN_KW, **({"scale": scaling} if "scale" in _VARLEN_KW else {})}
        out = varlen_attn(q, k, v, bounds, bounds, n, n, **extra)
    else:
        # torch.split, not slicing: the backward of a slice fills a whole zero tensor per
        # example, the backward of a split concatenates once. (1, heads, length, head_dim)
        # per example because the fused CPU kernels take 4D inputs only.
        sizes = bounds.diff().tolist()
        parts = [
            F.scaled_dot_product_attention(
                *(t.transpose(0, 1).unsqueeze(0) for t in qkv), is_causal=True, scale=scaling, dropout_p=p,
            )[0].transpose(0, 1)
            for qkv in zip(q.split(sizes), k.split(sizes), v.split(sizes))
        ]
        out = torch.cat(parts)
    return out.reshape(b, n, h, d), None


def register_packed_attention() -> None:
    """Make `PACKED` a known attention implementation (idempotent)."""
    from transformers import AttentionInterface

    if _varlen_available() and not _VARLEN_KW:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        # Some torch releases take is_causal, later ones a window where (-1, 0) is causal.
        _VARLEN_KW.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
        if "scale" in params:
            _VARLEN_KW["scale"] = None
    AttentionInterface.register(PACKED, packed_attention)


def use_packed_attention(model) -> None:
    """Switch `model` (plain or peft-wrapped) to packed attention and hand the bounds down once per forward."""
    register_packed_attention()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(PACKED)
    decoder = getattr(base, base.base_model_prefix)

    def add_bounds(_module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is not None:
            ids = kwargs.get("input_ids")
            rows = ids.shape[0] if ids is not None else pos.shape[0]
            kwargs[_BOUNDS] = example_bounds(pos.expand(rows, -1))
        return args, kwargs

    decoder.register_forward_pre_hook(add_bounds, with_kwargs=True)

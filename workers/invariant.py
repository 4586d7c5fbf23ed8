"""Batch-invariant arithmetic: a token's numbers do not depend on what shares its step.

In a continuous batch one step holds many requests' rows, and the kernels transformers calls
choose their reduction order from the shapes they are given: a matrix product of 33 rows or more
takes another path than one of up to 32 (oneDNN on this AMX CPU), and SDPA runs every query of
the step against every key of the step, masked, with blocks cut by the total length. So in bf16 a
request's text depended on its neighbours, on how its prompt was chunked, on prefix sharing
(blocks computed in another step) and on takeover (positions once decoded one by one, read in
again as a prompt). Here each row is computed the same way whatever else is in the step:
- a linear layer runs on slices of rows whose count lies in a band where the product's kernel
  does not change, found by trying (`row_band`: 1–32 rows in bf16 on this AMX CPU, 2–15 in
  fp32 on one thread; exactly 32 on a GPU, so that every call has one shape);
- attention runs in float32 on each request's own keys (those decoding one token together,
  padded to a multiple of 32 keys past the longest), as batched matrix products in which every
  matrix has one shape whatever the step (a query against a block of 32 keys), the blocks then
  added along one axis: masked keys (the future, the padding) add exact zeros, so a query gets
  the same numbers decoded alone, beside others, or read in a chunk of a prompt. A check at the
  first call confirms this machine's batched product keeps to it, else elementwise sums are
  used (tests/test_invariant.py checks both cores bit for bit).
What these choices cost is measured by bench/determinism.py (docs/decisions.md)."""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Row counts a matrix product may be given, as (fewest, most): every count in the band must
# give each row the same numbers. Found by `row_band` for a dtype on a CPU; on a GPU every call
# gets exactly `_FIXED_ROWS` rows (one shape, so one cuBLAS kernel).
_FIXED_ROWS = 32
_CANDIDATE_BANDS = [(1, 32), (2, 32), (2, 15), (2, 8), (_FIXED_ROWS, _FIXED_ROWS)]
_bands: dict[tuple, tuple[int, int]] = {}
# Floats a sum's products may hold at once (the query rows are sliced to fit).
_SUM_FLOATS = 8 << 20


def row_band(weight: torch.Tensor) -> tuple[int, int]:
    """The widest band of row counts in which this machine's product with `weight` gives a row
    the same numbers whatever the count, found once per shape, dtype and thread count. It
    depends on the library, the CPU, the shape and the threads: with torch 2.13 on this AMX CPU
    and one thread, bf16 has one kernel from 1 to 32 rows and another above, fp32 one for 1 row,
    one for 2–15 and one from 16; with two threads, fp32 576×576 varies from 2 rows on. A fixed
    count is always safe (a row's arithmetic depends on the shape, not on its place in the
    block), and costs the most."""
    key = (weight.dtype, weight.device.type, tuple(weight.shape), torch.get_num_threads())
    if key not in _bands:
        if weight.device.type != "cpu":
            _bands[key] = (_FIXED_ROWS, _FIXED_ROWS)
        else:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(_FIXED_ROWS + 1, weight.shape[1], generator=generator).to(weight.dtype)
            with torch.no_grad():
                _bands[key] = next(band for band in _CANDIDATE_BANDS if _consistent(weight, x, *band))
        fewest, most = _bands[key]
        log.info("batch invariance: products with %s weights %s take %d to %d rows", *key[:3:2], fewest, most)
    return _bands[key]


def _consistent(weight: torch.Tensor, x: torch.Tensor, fewest: int, most: int) -> bool:
    reference = F.linear(x[:most], weight)
    return all(
        torch.equal(F.linear(x[:rows], weight), reference[:rows]) for rows in range(fewest, most + 1)
    ) and torch.equal(F.linear(x[1 : most + 1], weight)[: most - 1], reference[1:])


def linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, each row with the numbers it would get alone (see `product`)."""
    return product(x, module.weight, module.bias)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, the rows in slices whose row count lies in the weight's band
    (the last one padded up to the band), so each row gets the numbers it would get alone."""
    fewest, most = row_band(weight)
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if fewest <= n <= most:
        return F.linear(x, weight, bias)
    pad = max(fewest - n % most, 0) if n % most else 0
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    out = torch.cat([F.linear(part, weight, bias) for part in rows.split(most)])[:n]
    return out.view(*x.shape[:-1], out.shape[-1])


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past: int, scale: float
) -> torch.Tensor:
    """Causal attention of one request: `query` [heads, Q, d] at positions past..past+Q-1,
    `key` and `value` [kv heads, past+Q, d]; returns [Q, heads, d] in the query's dtype."""
    heads, q_len, dim = query.shape
    kv_heads, k_len, _ = key.shape
    grouped = query.view(kv_heads, heads // kv_heads, q_len, dim).transpose(1, 2)  # [kv, Q, group, d]
    padded = -(-k_len // KEY_BLOCK) * KEY_BLOCK  # the keys past the last are the future: masked
    key, value = (F.pad(x.float(), (0, 0, 0, padded - k_len)) for x in (key, value))
    positions = torch.arange(padded, device=query.device)
    rows = max(1, _SUM_FLOATS // (heads * padded * dim))
    out = []
    for start in range(0, q_len, rows):
        last = past + start + torch.arange(min(rows, q_len - start), device=query.device)
        future = (positions[None, :] > last[:, None]).view(-1, padded // KEY_BLOCK, 1, KEY_BLOCK)
        out.append(_attend(grouped[:, start : start + rows].float(), key, value, future, scale))
    return torch.cat(out, dim=1).transpose(0, 1).reshape(q_len, heads, dim).to(query.dtype)


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    starts: list[int],
    ends: list[int],
    scale: float,
) -> torch.Tensor:
    """Attention of many requests' one new token each, at once: `query` [heads, B, d], request
    b's keys at `starts[b]:ends[b]` of `key` [kv heads, keys, d]. The keys are gathered into
    one padded block and the same arithmetic as `attention` runs on it: padding, like the
    future there, is masked, and so adds exact zeros. Returns [B, heads, d]."""
    heads, batch, dim = query.shape
    kv_heads, keys, _ = key.shape
    index, mask = _gather_plan(tuple(starts), tuple(ends), kv_heads, keys, query.device)
    longest = mask.shape[-1] * mask.shape[-3]
    flat_key, flat_value = (x.reshape(kv_heads * keys, dim) for x in (key, value))
    grouped = query.transpose(0, 1).reshape(batch, kv_heads, 1, heads // kv_heads, dim).float()
    rows = max(1, _SUM_FLOATS // (heads * longest * dim))
    out = []
    for start in range(0, batch, rows):
        part = index[start * kv_heads * longest : (start + rows) * kv_heads * longest]
        k, v = (
            x.index_select(0, part).float().view(-1, kv_heads, longest, dim) for x in (flat_key, flat_value)
        )
        out.append(_attend(grouped[start : start + rows], k, v, mask[start : start + rows], scale))
    return torch.cat(out).view(batch, heads, dim).to(query.dtype)


@functools.lru_cache(maxsize=8)
def _gather_plan(
    starts: tuple[int, ...], ends: tuple[int, ...], kv_heads: int, keys: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `decode_attention` reads each padded key from, and which keys are padding
    ([B, kv, Q, blocks, group, block]): the same for every layer of a step, so made once."""
    first, lengths = torch.tensor(starts, device=device), torch.tensor(ends, device=device)
    lengths = lengths - first
    longest = -(-int(lengths.max()) // KEY_BLOCK) * KEY_BLOCK
    offsets = torch.arange(longest, device=device)
    padding = offsets[None, :] >= lengths[:, None]  # [B, longest]
    # Padding reads the request's first key (any real one would do: its weight is exactly 0).
    index = torch.where(padding, first[:, None], first[:, None] + offsets)
    # Row h·keys + i of the flattened keys is head h's key i: one gather gives [B, kv, longest, d].
    index = (index[:, None, :] + keys * torch.arange(kv_heads, device=device)[None, :, None]).flatten()
    return index, padding.view(len(starts), 1, 1, -1, 1, KEY_BLOCK)


# Keys are taken `KEY_BLOCK` at a time by the attention's sums (see `_products`).
KEY_BLOCK = 32
_cores: dict[tuple[str, int], Any] = {}


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, hidden: torch.Tensor, scale: float):
    """softmax(q·kᵀ, masked) · v in float32, for queries [..., kv heads, Q, group, d] and keys and
    values [..., kv heads, keys, d] (a multiple of `KEY_BLOCK`; `hidden` masks keys as
    [..., Q, blocks, 1, block]); returns [..., kv heads, Q, group, d], by the core this machine
    keeps invariant (`attention_core`)."""
    return attention_core(query.device)(query, key, value, hidden, scale)


def attention_core(device: torch.device) -> Any:
    """`_products` where this device's batched matrix product gives each matrix the same numbers
    whatever else the batch holds (checked once per device and thread count by `_invariant`;
    so it is with torch 2.13 on this CPU), else `_elementwise`, which relies on no library's
    blocking."""
    key = (device.type, torch.get_num_threads())
    if key not in _cores:
        _cores[key] = _products if _invariant(_products, device) else _elementwise
        log.info("batch invariance: attention by %s on %s", _cores[key].__name__.strip("_"), key[0])
    return _cores[key]


def _products(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, hidden: torch.Tensor, scale: float
):
    """Both sums as batched matrix products in which every matrix has one shape whatever the
    step: a query's scores against a block of `KEY_BLOCK` keys ([group, d]·[d, block]) and its
    weighted sum of a block's values ([group, block]·[block, d]); the blocks are then added
    along one axis, so padding and the future add exact zeros."""
    blocks = key.shape[-2] // KEY_BLOCK
    keys, values = (x.unflatten(-2, (blocks, KEY_BLOCK)).unsqueeze(-4) for x in (key, value))
    scores = torch.matmul(query.unsqueeze(-3), keys.transpose(-1, -2))  # [..., kv, Q, blocks, group, block]
    weights = _softmax(scores.mul_(scale).masked_fill_(hidden, float("-inf")))
    return torch.matmul(weights, values).sum(dim=-3)


def _elementwise(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, hidden: torch.Tensor, scale: float
):
    """`_products` as elementwise products summed along one axis (order fixed by that axis
    alone), several times slower: for a device whose batched product fails `_invariant`."""
    blocks = key.shape[-2] // KEY_BLOCK
    keys, values = (x.unflatten(-2, (blocks, KEY_BLOCK)).unsqueeze(-3).unsqueeze(-5) for x in (key, value))
    scores = (query.unsqueeze(-3).unsqueeze(-2) * keys).sum(dim=-1)  # [..., kv, Q, blocks, group, block]
    weights = _softmax(scores.mul_(scale).masked_fill_(hidden, float("-inf")))
    return (weights.unsqueeze(-1) * values).sum(dim=-2).sum(dim=-3)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the keys of scores [..., blocks, group, block]: the block sums are added one
    after another, then the block's lanes, so more blocks of padding only add exact zeros
    (torch's own softmax sums a short tail another way than a long row)."""
    exp = torch.exp(scores - scores.amax(dim=(-3, -1), keepdim=True))
    return exp.div_(exp.sum(dim=-3, keepdim=True).sum(dim=-1, keepdim=True))


def _invariant(core: Any, device: torch.device) -> bool:
    """Whether `core` gives a query the same numbers decoded alone, decoded beside longer
    requests (more blocks, more matrices in the batch) and read in a prompt chunk, on random
    requests of a few lengths."""
    generator = torch.Generator().manual_seed(0)
    kv_heads, group, dim, longest, chunk = 3, 3, 64, 32 * KEY_BLOCK, 9

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    lengths = [5, KEY_BLOCK + 1, 2 * KEY_BLOCK, 300, longest]
    keys, values = (draw(len(lengths), kv_heads, longest, dim) for _ in range(2))
    queries = draw(len(lengths), kv_heads, chunk, group, dim)
    padding = torch.arange(longest, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
    batched = core(queries[:, :, -1:], keys, values, padding.view(len(lengths), 1, 1, -1, 1, KEY_BLOCK), 1.0)
    for b, n in enumerate(lengths):
        width = -(-n // KEY_BLOCK) * KEY_BLOCK
        k, v, q = keys[b : b + 1, :, :width], values[b : b + 1, :, :width], queries[b : b + 1, :, -1:]
        alone = core(q, k, v, padding[b : b + 1, :width].view(1, 1, 1, -1, 1, KEY_BLOCK), 1.0)
        last = n - chunk + torch.arange(chunk, device=device)
        future = torch.arange(width, device=device)[None, :] > last[:, None]
        read = core(
            queries[b], keys[b, :, :width], values[b, :, :width], future.view(chunk, -1, 1, KEY_BLOCK), 1.0
        )
        if not (torch.equal(alone[0], batched[b]) and torch.equal(read[:, -1:], batched[b])):
            return False
    return True


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *,
    fallback: Any,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention call for a continuous batch (`query` [1, heads, tokens, d], the
    step's keys [1, kv heads, keys, d] request after request, `cu_seq_lens_q/k` where each
    starts): the requests that decode one token together, the others one at a time. A call
    for one request outside a continuous batch (the one-at-a-time engine: its new tokens, the
    keys of all its positions, nothing padded) is that request alone. Other calls go to
    `fallback`."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.shape[0] == 1 and cu_q is None and cu_k is None:
        past = key.shape[2] - query.shape[2]
        return attention(query[0], key[0], value[0], past, scale).unsqueeze(0), None
    if not isinstance(cu_q, torch.Tensor) or not isinstance(cu_k, torch.Tensor) or query.shape[0] != 1:
        return fallback(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    out = query.new_zeros(query.shape[2], query.shape[1], query.shape[3])
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    decoding: list[int] = []
    for r in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[r], starts_q[r + 1], starts_k[r], starts_k[r + 1]
        if q1 - q0 == 1:
            decoding.append(r)
        elif q1 > q0:
            past = (k1 - k0) - (q1 - q0)
            out[q0:q1] = attention(query[0, :, q0:q1], key[0, :, k0:k1], value[0, :, k0:k1], past, scale)
    if decoding:
        rows = torch.tensor([starts_q[r] for r in decoding], device=query.device)
        starts, ends = [starts_k[r] for r in decoding], [starts_k[r + 1] for r in decoding]
        out[rows] = decode_attention(query[0][:, rows], key[0], value[0], starts, ends, scale)
    return out.unsqueeze(0), None


def config_window(config: Any) -> bool:
    """Whether a config without `layer_types` uses a sliding window."""
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)


def install(model: torch.nn.Module) -> None:
    """Makes `model`'s linear layers and its attention batch-invariant (installed once)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    layer_types = getattr(config, "layer_types", None)
    windowed = any(t != "full_attention" for t in layer_types) if layer_types else config_window(config)
    if windowed:
        raise ValueError("--batch-invariant covers full attention only; this model has sliding-window layers")
    loaded_with = config._attn_implementation
    if loaded_with != "sdpa":
        raise ValueError(f"--batch-invariant replaces SDPA; this model was loaded with {loaded_with}")
    for layer in model.modules():
        layer.corral_invariant = True  # read by the attention call: other models keep SDPA
        if type(layer) is torch.nn.Linear:
            layer.forward = types.MethodType(linear, layer)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(sdpa, "corral_invariant", False):
        # transformers looks attention up by name in a registry shared by every model.
        def invariant_sdpa(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
            if getattr(module, "corral_invariant", False):
                return paged_attention(module, *args, fallback=sdpa, **kwargs)
            return sdpa(module, *args, **kwargs)

        invariant_sdpa.corral_invariant = True  # type: ignore[attr-defined]
        AttentionInterface.register("sdpa", invariant_sdpa)
    log.info("batch-invariant linear layers and attention installed")

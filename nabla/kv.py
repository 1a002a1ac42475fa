"""Key/value caches of fixed prefixes, and soft (probability-weighted) token embeddings.

A DTO run evaluates the same prompt and committed tokens at every step. Their key/value states are computed
once (without gradient) and every step extends a *view* of them: a fresh ``DynamicCache`` whose layers point at
slices of the stored tensors. transformers' ``DynamicLayer.update`` grows a layer by ``torch.cat``, which writes
new tensors, so a view is never modified and the stored prefix stays out of every autograd graph.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from nabla.errors import ConfigurationError


def cache_length(cache: Cache | None) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def prefix_view(cache: Cache, length: int) -> DynamicCache:
    """A new cache holding the first ``length`` positions of ``cache`` without copying them.

    Only full-attention layers can be cut at an arbitrary position; a sliding-window layer can while the window
    still holds every position. Anything else is refused with a clear error rather than silently mis-attended.
    """
    if length > cache_length(cache):
        raise ValueError(f"cannot view {length} positions of a cache that holds {cache_length(cache)}")
    layers = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer and not _sliding_layer_holds_all(layer):
            raise ConfigurationError(
                f"prefix caching does not support cache layer {type(layer).__name__}; "
                "set acceleration.prefix_cache=false for this model"
            )
        view = copy.copy(layer)
        if layer.is_initialized:
            view.keys = layer.keys[..., :length, :].detach()
            view.values = layer.values[..., :length, :].detach()
            if hasattr(view, "cumulative_length"):
                view.cumulative_length = length
        layers.append(view)
    return _cache_from_layers(layers)


def _sliding_layer_holds_all(layer: object) -> bool:
    window = getattr(layer, "sliding_window", None)
    cumulative = getattr(layer, "cumulative_length", None)
    return window is not None and cumulative is not None and cumulative < window - 1


def _cache_from_layers(layers: list) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = layers
    return cache


def select_batch_row(cache: Cache, row: int, start: int, stop: int) -> DynamicCache:
    """Positions ``start:stop`` of one sequence of a batched cache, sharing storage (drops its left padding)."""
    layers = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise ConfigurationError(f"batched cache reuse does not support {type(layer).__name__} layers")
        view = copy.copy(layer)
        if layer.is_initialized:
            view.keys = layer.keys[row : row + 1, :, start:stop, :]
            view.values = layer.values[row : row + 1, :, start:stop, :]
        layers.append(view)
    return _cache_from_layers(layers)


def clone_cache(cache: Cache) -> DynamicCache:
    """A copy of ``cache`` that owns its tensors (a view would keep the whole batch it was cut from alive)."""
    layers = []
    for layer in cache.layers:
        copied = copy.copy(layer)
        if layer.is_initialized:
            copied.keys, copied.values = layer.keys.clone(), layer.values.clone()
        layers.append(copied)
    return _cache_from_layers(layers)


def stack_left_padded(caches: list[Cache], lengths: list[int], device: torch.device) -> tuple[DynamicCache, Tensor]:
    """Single-sequence caches of different lengths as one left-padded batch, with its attention mask."""
    width = max(lengths)
    mask = torch.zeros((len(caches), width), dtype=torch.long, device=device)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    layers = []
    for index, template in enumerate(caches[0].layers):
        if type(template) is not DynamicLayer:
            raise ConfigurationError(f"batched cache reuse does not support {type(template).__name__} layers")
        keys, values = [], []
        for cache, length in zip(caches, lengths):
            layer = cache.layers[index]
            pad = width - length
            keys.append(torch.nn.functional.pad(layer.keys[..., :length, :], (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(layer.values[..., :length, :], (0, 0, pad, 0)))
        merged = copy.copy(template)
        merged.keys, merged.values = torch.cat(keys), torch.cat(values)
        layers.append(merged)
    return _cache_from_layers(layers), mask


def forward_after_prefixes(
    forward: Callable[..., Tensor], rows: list[tuple[Cache | None, int, Tensor]], device: torch.device
) -> list[Tensor]:
    """Run ``forward`` once over several rows, each ``(cache, cached_length, inputs_embeds)``: new positions
    (``(n_b, d)``) after the first ``cached_length`` positions of that row's own cache (or after nothing).

    One row runs exactly as it would alone (no padding). Several rows run as one batch: their prefix states are
    stacked left-padded, their new positions right-padded, and each row's outputs (``(n_b, ...)``) are returned.
    ``forward(inputs_embeds=, attention_mask=, position_ids=, cache=)`` returns per-position outputs.
    """
    if len(rows) == 1:
        cache, start, inputs = rows[0]
        view = prefix_view(cache, start) if cache is not None else None
        positions = torch.arange(start, start + inputs.shape[0], device=device)[None]
        return [forward(inputs_embeds=inputs[None], attention_mask=None, position_ids=positions, cache=view)[0]]
    if any(cache is None for cache, _, _ in rows):
        return [out for row in rows for out in forward_after_prefixes(forward, [row], device)]
    lengths = [start for _, start, _ in rows]
    cache, prefix_mask = stack_left_padded([c for c, _, _ in rows], lengths, device)
    widths = [inputs.shape[0] for _, _, inputs in rows]
    inputs = torch.nn.utils.rnn.pad_sequence([x for _, _, x in rows], batch_first=True)
    new_mask = (torch.arange(max(widths), device=device)[None] < torch.tensor(widths, device=device)[:, None]).long()
    positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(max(widths), device=device)[None]
    mask = torch.cat([prefix_mask, new_mask], dim=-1)
    out = forward(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, cache=cache)
    return [out[b, :width] for b, width in enumerate(widths)]


def soft_embed(embedding: torch.nn.Module, weights: Tensor) -> Tensor:
    """Embed rows of token weights (``(..., V)``, one-hot or soft) as ``weights @ E``.

    Applies the embedding module's own scale when it has one (Gemma multiplies looked-up rows by ``sqrt(d)``),
    so that a hard one-hot gives exactly what the module returns for that token id.
    """
    table: Tensor = embedding.weight
    embedded = weights.to(table.dtype) @ table
    scale = getattr(embedding, "embed_scale", None)
    if scale is not None:
        embedded = embedded * torch.as_tensor(scale, device=embedded.device).to(embedded.dtype)
    return embedded

"""Embeddings from a causal LM (the engines' `embed`)."""

from __future__ import annotations

import torch


@torch.no_grad()
def mean_pooled(model, inputs: list[list[int]]) -> list[list[float]]:
    """Mean-pooled, L2-normalised last hidden states of a causal LM's base model."""
    device = model.device
    width = max(len(ids) for ids in inputs)
    ids = torch.zeros(len(inputs), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(inputs), width, dtype=torch.long, device=device)
    for row, tokens in enumerate(inputs):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)  # [B, H]
    return torch.nn.functional.normalize(pooled.float(), dim=-1).tolist()

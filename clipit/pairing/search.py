"""Exact top-k cosine search (Eq. 1): chunked matmul over L2-normalised embeddings.

Exact duplicate keys (the same report twice) are searched once and expanded in index order, so a tie
always goes to the lower report index: a GEMM may give identical rows scores that differ in the last
bit, which would otherwise make the winner depend on the row's position in the block.
"""
from __future__ import annotations

import numpy as np
import torch


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


@torch.no_grad()
def topk_cosine(
    queries: torch.Tensor | np.ndarray,
    keys: torch.Tensor | np.ndarray,
    k: int = 1,
    chunk_size: int = 8192,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the indices and cosine scores of its k most similar key rows.

    Returns (indices int64 [N, k], scores float32 [N, k]), best first. Rows are normalised here, so
    callers may pass raw embeddings. Keys stay resident on `device`; queries stream in chunks and
    results come back to the host once per chunk, never per query.
    """
    queries = torch.as_tensor(queries)
    keys = torch.as_tensor(keys)
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"embedding dims differ: queries {tuple(queries.shape)} vs keys {tuple(keys.shape)}")
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of keys ({keys.shape[0]})")
    device = torch.device(device) if device is not None else keys.device
    unique, inverse = np.unique(keys.float().cpu().numpy(), axis=0, return_inverse=True)
    if len(unique) < len(keys):
        return _expand_duplicates(queries, torch.from_numpy(unique), inverse.reshape(-1), k, chunk_size, device)
    keys_n = l2_normalize(keys.to(device=device, dtype=torch.float32))
    out_idx = np.empty((queries.shape[0], k), dtype=np.int64)
    out_val = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], chunk_size):
        q = l2_normalize(queries[start : start + chunk_size].to(device=device, dtype=torch.float32))
        sims = q @ keys_n.T
        if k == 1:
            val, idx = sims.max(dim=1, keepdim=True)  # first maximal index on ties
        else:
            # a stable descending sort keeps equal scores in index order
            val, idx = torch.sort(sims, dim=1, descending=True, stable=True)
            val, idx = val[:, :k], idx[:, :k]
        out_idx[start : start + len(q)] = idx.cpu().numpy()
        out_val[start : start + len(q)] = val.cpu().numpy()
    return out_idx, out_val


def _expand_duplicates(queries, unique_keys, inverse, k, chunk_size, device):
    """Top-k over unique key rows, then each unique row replaced by its original indices, lowest first."""
    groups = [np.flatnonzero(inverse == u) for u in range(len(unique_keys))]
    width = max(len(g) for g in groups)
    members = np.full((len(groups), width), -1, dtype=np.int64)  # unique row -> original indices, padded
    for u, g in enumerate(groups):
        members[u, : len(g)] = g
    u_idx, u_val = topk_cosine(queries, unique_keys, k=min(k, len(groups)), chunk_size=chunk_size, device=device)
    expanded = members[u_idx].reshape(len(u_idx), -1)  # [N, k' * width], best unique row first
    scores = np.repeat(u_val, width, axis=1)
    valid = expanded >= 0
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # keep valid entries, in order
    return np.take_along_axis(expanded, order, 1), np.take_along_axis(scores, order, 1)

"""Exact top-k cosine search (Eq. 1) over L2-normalised embeddings: a chunked matmul in torch, or
faiss-cpu's IndexFlatIP where that is faster (CPU, many keys).

Exact duplicate keys (the same report twice) are searched once and expanded in index order, so a tie
always goes to the lower report index: a GEMM may give identical rows scores that differ in the last
bit, which would otherwise make the winner depend on the row's position in the block (or, for faiss,
on its heap order). Both backends therefore return the same indices; scores agree to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from clipit.errors import ConfigError

BACKENDS = ("auto", "torch", "faiss")
# `auto` uses faiss on CPU from this many keys (rows) on: there faiss-cpu's blocked GEMM + top-1 scan was
# as fast as torch's or faster in most runs of bench/bench_pairing.py (2-core EPYC, shared and noisy:
# torch 0.84-1.31x of faiss at 100k x 10k); below it torch was faster (no index). On a GPU, torch.
FAISS_MIN_KEYS = 1024
_BUFFER_FLOATS = 1 << 24  # similarity block per chunk: 64 MiB of fp32 (keeps the GEMM efficient, caps RAM)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(backend: str, num_keys: int, device: torch.device) -> str:
    """Resolve `auto`: faiss on CPU for large key sets when installed, torch otherwise (and on GPU)."""
    if backend not in BACKENDS:
        raise ConfigError(f"pairing.search = {backend!r} is not a search backend; choose one of {list(BACKENDS)}")
    if backend == "auto":
        use_faiss = device.type == "cpu" and num_keys >= FAISS_MIN_KEYS and faiss_available()
        return "faiss" if use_faiss else "torch"
    if backend == "faiss" and not faiss_available():
        raise ConfigError(
            "pairing.search: faiss needs faiss-cpu: pip install 'clipit[faiss]', or set pairing.search: auto"
        )
    return backend


@torch.no_grad()
def topk_cosine(
    queries: torch.Tensor | np.ndarray,
    keys: torch.Tensor | np.ndarray,
    k: int = 1,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    backend: str = "torch",
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the indices and cosine scores of its k most similar key rows.

    Returns (indices int64 [N, k], scores float32 [N, k]), best first, ties to the lower index. Rows are
    normalised here, so callers may pass raw embeddings. Keys stay resident on `device`; queries stream
    in chunks and results come back to the host once per chunk, never per query. `backend` is torch,
    faiss (CPU) or auto (see choose_backend).
    """
    queries = torch.as_tensor(queries)
    keys = torch.as_tensor(keys)
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"embedding dims differ: queries {tuple(queries.shape)} vs keys {tuple(keys.shape)}")
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of keys ({keys.shape[0]})")
    device = torch.device(device) if device is not None else keys.device
    unique, inverse = _unique_rows(keys)
    if len(unique) < len(keys):
        return _expand_duplicates(queries, torch.from_numpy(unique), inverse, k, chunk_size, device, backend)
    backend = choose_backend(backend, keys.shape[0], device)
    if backend == "faiss":
        return _faiss_topk(queries, keys, k, chunk_size)
    return _torch_topk(queries, keys, k, chunk_size, device)


def _unique_rows(keys: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Exact-duplicate rows collapsed, in order of first occurrence (so a lower unique index is a lower
    original index); returns (unique rows, original row -> unique row). Hashing rows is O(M)."""
    rows = np.ascontiguousarray(keys.float().cpu().numpy())
    seen: dict[bytes, int] = {}
    inverse = np.fromiter((seen.setdefault(r.tobytes(), len(seen)) for r in rows), dtype=np.int64, count=len(rows))
    if len(seen) == len(rows):
        return rows, inverse
    first = np.unique(inverse, return_index=True)[1]  # ids were handed out in first-occurrence order
    return rows[first], inverse


def _default_chunk(num_keys: int) -> int:
    return int(min(16384, max(256, _BUFFER_FLOATS // max(1, num_keys))))


def _torch_topk(queries, keys, k, chunk_size, device):
    keys_n = l2_normalize(keys.to(device=device, dtype=torch.float32))
    n, m = queries.shape[0], keys_n.shape[0]
    chunk = chunk_size or _default_chunk(m)
    out_idx = np.empty((n, k), dtype=np.int64)
    out_val = np.empty((n, k), dtype=np.float32)
    # One preallocated similarity block, reused: a fresh [chunk, M] tensor per chunk costs page faults.
    block = torch.empty((min(chunk, n), m), dtype=torch.float32, device=device)
    keys_t = keys_n.T
    for start in range(0, n, chunk):
        q = l2_normalize(queries[start : start + chunk].to(device=device, dtype=torch.float32))
        sims = torch.mm(q, keys_t, out=block[: len(q)])
        if k == 1:
            val, idx = sims.max(dim=1, keepdim=True)  # first maximal index on ties
        else:
            val, idx = _topk_lowest_index_on_ties(sims, k)
        out_idx[start : start + len(q)] = idx.cpu().numpy()
        out_val[start : start + len(q)] = val.cpu().numpy()
    return out_idx, out_val


def _topk_lowest_index_on_ties(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk, with equal scores ordered by index (topk itself does not promise an order for ties).

    Rows where a tie straddles the k-th place are redone with a stable full sort (rare: exact ties
    between distinct keys)."""
    val, idx = torch.topk(sims, k, dim=1)
    # within the k, order equal values by index: sort by index, then stable-sort by value
    by_index = torch.argsort(idx, dim=1)
    val, idx = val.gather(1, by_index), idx.gather(1, by_index)
    order = torch.sort(val, dim=1, descending=True, stable=True).indices
    val, idx = val.gather(1, order), idx.gather(1, order)
    kth = val[:, -1:]
    straddle = ((sims >= kth).sum(dim=1) > k).nonzero().flatten()
    if len(straddle):
        sv, si = torch.sort(sims[straddle], dim=1, descending=True, stable=True)
        val[straddle], idx[straddle] = sv[:, :k], si[:, :k]
    return val, idx


def _faiss_topk(queries, keys, k, chunk_size):
    import faiss

    keys_n = np.ascontiguousarray(l2_normalize(keys.float().cpu()).numpy())
    index = faiss.IndexFlatIP(keys_n.shape[1])
    index.add(keys_n)
    n = queries.shape[0]
    chunk = chunk_size or 65536  # faiss blocks internally; chunks only bound host memory for the queries
    out_idx = np.empty((n, k), dtype=np.int64)
    out_val = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        q = np.ascontiguousarray(l2_normalize(queries[start : start + chunk].float().cpu()).numpy())
        val, idx = index.search(q, k)
        if k > 1:  # equal scores in index order (faiss's heap order is unspecified)
            order = np.lexsort((idx, -val), axis=1)
            val, idx = np.take_along_axis(val, order, 1), np.take_along_axis(idx, order, 1)
        out_idx[start : start + len(q)] = idx
        out_val[start : start + len(q)] = val
    return out_idx, out_val


def _expand_duplicates(queries, unique_keys, inverse, k, chunk_size, device, backend):
    """Top-k over unique key rows, then each unique row replaced by its original indices, lowest first."""
    order = np.argsort(inverse, kind="stable")  # original indices grouped by unique row, ascending within
    groups = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(unique_keys)))[:-1])
    width = max(len(g) for g in groups)
    members = np.full((len(groups), width), -1, dtype=np.int64)  # unique row -> original indices, padded
    for u, g in enumerate(groups):
        members[u, : len(g)] = g
    u_idx, u_val = topk_cosine(
        queries, unique_keys, k=min(k, len(groups)), chunk_size=chunk_size, device=device, backend=backend
    )
    expanded = members[u_idx].reshape(len(u_idx), -1)  # [N, k' * width], best unique row first
    scores = np.repeat(u_val, width, axis=1)
    valid = expanded >= 0
    # valid entries first, then by score, then by original index: a member of a later unique row may
    # have a lower index than the second member of an earlier one with an equal score
    order = np.lexsort((np.where(valid, expanded, np.iinfo(np.int64).max), -scores, ~valid), axis=1)[:, :k]
    return np.take_along_axis(expanded, order, 1), np.take_along_axis(scores, order, 1)

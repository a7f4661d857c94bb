import numpy as np
import pytest
import torch

from clipit.pairing.search import topk_cosine


def signs(rng, n, dim=16):
    """Rows of +-1: normalised entries are +-1/4, so every cosine is a multiple of 1/16 and exact in
    float32 whatever order a BLAS kernel sums in. Ties in the references are then real ties on every
    machine (a Gaussian reference breaks them by GEMM rounding, which differs between BLAS kernels)."""
    return rng.choice([-1.0, 1.0], size=(n, dim)).astype(np.float32)


def brute_force(queries, keys, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    sims = q @ c.T
    # sort by (-score, index): the lower index wins a tie
    order = np.lexsort((np.broadcast_to(np.arange(len(keys)), sims.shape), -sims), axis=1)[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_matches_numpy_brute_force(k, chunk):
    rng = np.random.default_rng(0)
    queries, keys = rng.normal(size=(103, 32)), rng.normal(size=(40, 32))
    idx, val = topk_cosine(queries, keys, k=k, chunk_size=chunk)
    ref_idx, ref_val = brute_force(queries, keys, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(val, ref_val, atol=1e-5)
    assert idx.shape == (103, k) and val.dtype == np.float32


@pytest.mark.parametrize("k", [1, 4])
def test_ties_break_towards_lower_index(k):
    rng = np.random.default_rng(1)
    base = signs(rng, 5)
    keys = np.concatenate([base, base, base])  # rows i, i+5, i+10 are exact ties
    queries = np.concatenate([base, signs(rng, 20)])
    idx, val = topk_cosine(queries, keys, k=k, chunk_size=4)
    ref_idx, _ = brute_force(queries, keys, k)
    np.testing.assert_array_equal(idx, ref_idx)
    assert (idx[:5, 0] == np.arange(5)).all()
    if k >= 3:
        assert (idx[:5, :3] == np.arange(5)[:, None] + [0, 5, 10]).all()


def test_scores_are_cosines_of_unnormalised_inputs():
    q = torch.tensor([[3.0, 0.0]])
    keys = torch.tensor([[0.0, 5.0], [2.0, 2.0], [10.0, 0.1]])
    idx, val = topk_cosine(q, keys, k=3)
    assert idx.tolist() == [[2, 1, 0]]
    np.testing.assert_allclose(val[0], [10 / np.hypot(10, 0.1), np.sqrt(0.5), 0.0], atol=1e-6)


def test_bad_shapes_and_k():
    with pytest.raises(ValueError, match="dims differ"):
        topk_cosine(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="k=3"):
        topk_cosine(np.ones((2, 3)), np.ones((2, 3)), k=3)


# --------------------------------------------------------------------------- faiss backend and auto choice
faiss = pytest.importorskip("faiss")


@pytest.mark.parametrize("k", [1, 5])
def test_faiss_gives_the_same_pairs_as_torch(k):
    rng = np.random.default_rng(2)
    queries, keys = rng.normal(size=(2000, 64)), rng.normal(size=(700, 64))
    t_idx, t_val = topk_cosine(queries, keys, k=k, backend="torch", chunk_size=333)
    f_idx, f_val = topk_cosine(queries, keys, k=k, backend="faiss", chunk_size=500)
    np.testing.assert_array_equal(f_idx, t_idx)
    np.testing.assert_allclose(f_val, t_val, atol=1e-5)
    np.testing.assert_array_equal(t_idx, brute_force(queries, keys, k)[0])


@pytest.mark.parametrize("k", [1, 4])
def test_faiss_breaks_ties_like_torch(k):
    rng = np.random.default_rng(3)
    base = signs(rng, 6)
    keys = np.concatenate([base, base, base])
    queries = np.concatenate([base, signs(rng, 30)])
    f_idx, _ = topk_cosine(queries, keys, k=k, backend="faiss")
    np.testing.assert_array_equal(f_idx, topk_cosine(queries, keys, k=k, backend="torch")[0])
    np.testing.assert_array_equal(f_idx, brute_force(queries, keys, k)[0])


def test_auto_backend_choice():
    from clipit.pairing.search import FAISS_MIN_KEYS, choose_backend

    cpu = torch.device("cpu")
    assert choose_backend("auto", FAISS_MIN_KEYS, cpu) == "faiss"
    assert choose_backend("auto", FAISS_MIN_KEYS - 1, cpu) == "torch"
    assert choose_backend("auto", 10**6, torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="is not a search backend"):
        choose_backend("annoy", 10, cpu)


def test_topk_on_ties_straddling_the_kth_place():
    # keys 1 and 2 tie for second place: k=2 must keep the lower index
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [0.0, 1.0]])
    idx, _ = topk_cosine(q, keys, k=2)
    assert idx.tolist() == [[0, 1]]

import numpy as np
import pytest
import torch

from clipit.pairing.search import topk_cosine


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
    base = rng.normal(size=(5, 16))
    keys = np.concatenate([base, base, base]).astype(np.float32)  # rows i, i+5, i+10 are exact ties
    queries = np.concatenate([base, rng.normal(size=(20, 16))])
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

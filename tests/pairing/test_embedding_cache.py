"""The text-embedding cache: round trip, staleness by model and corpus, refused inputs."""

import json

import numpy as np
import pytest

from clipit.corpus import CorpusError, Report, corpus_fingerprint
from clipit.pairing.embedding_cache import load_text_embeddings, save_text_embeddings


def test_embedding_cache_round_trip_and_staleness(tmp_path):
    reps = [Report(f"r{i}", f"report {i}") for i in range(5)]
    emb = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float16)
    ident = {"model": "conch_ViT-B-16", "ctx": 127, "lora": None, "layers": (1, 2)}
    d = tmp_path / "cache"
    assert load_text_embeddings(d) is None
    save_text_embeddings(d, emb, reps, ident)
    fp = corpus_fingerprint(reps)
    got, ids = load_text_embeddings(d, expect_identity=dict(ident), expect_fingerprint=fp)
    assert got.dtype == np.float16 and np.array_equal(got, emb) and ids == [r.id for r in reps]
    assert not [f for f in d.iterdir() if f.name.endswith(".tmp")]
    assert load_text_embeddings(d, expect_identity={**ident, "model": "other"}) is None
    changed = reps[:4] + [Report("r4", "report 4 edited")]
    assert corpus_fingerprint(changed) != fp
    assert load_text_embeddings(d, expect_fingerprint=corpus_fingerprint(changed)) is None
    # ids/texts are length-prefixed: moving characters between them changes the fingerprint
    assert corpus_fingerprint([Report("ab", "c")]) != corpus_fingerprint([Report("a", "bc")])


def test_embedding_cache_errors(tmp_path):
    reps = [Report(f"r{i}", "t") for i in range(3)]
    d = tmp_path / "cache"
    with pytest.raises(CorpusError, match="do not match 3 reports"):
        save_text_embeddings(d, np.zeros((2, 4), np.float32), reps, {})
    with pytest.raises(CorpusError, match="dtype float64"):
        save_text_embeddings(d, np.zeros((3, 4)), reps, {})
    with pytest.raises(CorpusError, match="NaN"):
        save_text_embeddings(d, np.full((3, 4), np.nan, np.float32), reps, {})
    save_text_embeddings(d, np.zeros((3, 4), np.float32), reps, {"m": 1})
    (d / "ids.json").write_text(json.dumps(["r0", "r1"]))
    with pytest.raises(CorpusError, match=r"corrupt cache: embeddings \(3, 4\) vs 2 ids"):
        load_text_embeddings(d)
    (d / "embeddings.npy").write_bytes(b"garbage")
    with pytest.raises(CorpusError, match="corrupt text-embedding cache"):
        load_text_embeddings(d)
    (d / "identity.json").write_text("{")
    with pytest.raises(CorpusError, match="corrupt cache marker"):
        load_text_embeddings(d)
    # a rewrite that dies before its marker leaves an absent (not a stale-but-valid) cache
    (d / "identity.json").unlink()
    assert load_text_embeddings(d) is None

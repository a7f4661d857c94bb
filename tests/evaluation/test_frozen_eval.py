"""`clipit evaluate --frozen` (clipit/evaluation/frozen.py): k-NN and SimpleShot pinned on hand-made
features, then run on the tiny demo's unimodal and CLIP-IT backbones through the feature cache."""

import json
import shutil

import numpy as np
import pytest

from clipit.evaluation.frozen import balanced_accuracy, knn_predict, simpleshot
from clipit.io import sha256_file
from clipit_testing import TINY, cli, shard_copy, with_shards


def test_knn_votes_by_cosine_and_breaks_ties_by_similarity():
    index = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [0.0, 5.0]])  # length does not matter: cosine
    labels = np.array([0, 0, 1, 1])
    assert knn_predict(index, labels, np.array([[3.0, 0.2], [0.1, 2.0]]), 2, k=2).tolist() == [0, 1]
    # k = 4 takes everything: 2 votes each; the class whose voters are closer in sum wins
    assert knn_predict(index, labels, np.array([[1.0, 0.1], [0.1, 1.0]]), 2, k=4).tolist() == [0, 1]
    # k larger than the labelled set: all of it
    assert knn_predict(index[:1], labels[:1], np.array([[0.0, 1.0]]), 2, k=20).tolist() == [0]


def test_simpleshot_is_nearest_centred_class_mean_and_seeded():
    rng = np.random.default_rng(1)
    centres = np.array([[5.0, 0.0, 1.0], [0.0, 5.0, 1.0], [-5.0, -5.0, 1.0]])
    train_y = np.repeat([0, 1, 2], 30)
    train_x = centres[train_y] + rng.normal(0, 0.3, (90, 3))
    query_y = np.repeat([0, 1, 2], 10)
    query_x = centres[query_y] + rng.normal(0, 0.3, (30, 3))
    one = simpleshot(train_x, train_y, query_x, query_y, 3, shots=1, episodes=5)
    assert len(one) == 5 and all(v == 1.0 for v in one)  # well separated: one shot is enough
    # overlapping classes: episodes differ, a seed repeats them, more shots do no worse on average
    noisy = centres[train_y] + rng.normal(0, 6.0, (90, 3))
    queries = centres[query_y] + rng.normal(0, 6.0, (30, 3))
    a = simpleshot(noisy, train_y, queries, query_y, 3, shots=1, episodes=20, seed=3)
    assert a == simpleshot(noisy, train_y, queries, query_y, 3, shots=1, episodes=20, seed=3)
    assert len(set(a)) > 1
    b = simpleshot(noisy, train_y, queries, query_y, 3, shots=16, episodes=20, seed=3)
    assert np.mean(b) >= np.mean(a) - 0.05
    assert balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]), 2) == 0.5


@pytest.mark.slow  # ~30 s on 2 cores beyond the session's demo: three evaluations, two cache builds
def test_frozen_eval_of_the_demo_backbones(tiny_demo, tiny_shards, tmp_path):
    out, _ = tiny_demo
    mine = tmp_path / "out"
    for method in ("unimodal", "clipit"):  # a private copy: the session's demo stays as it was
        shutil.copytree(out / "runs" / method / "seed-0", mine / "runs" / method / "seed-0")
    shards = shard_copy(tiny_shards, tmp_path)
    sets = [f"output_dir={mine}", *with_shards(tiny_shards, shards)]
    results = {}
    for method in ("unimodal", "clipit"):
        r = cli(
            "evaluate",
            "--config",
            TINY,
            "--method",
            method,
            "--seed",
            "0",
            "--frozen",
            *[a for s in sets for a in ("--set", s)],
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert "k-NN balanced accuracy" in r.stdout and "16-shot" in r.stdout
        results[method] = json.loads((mine / "runs" / method / "seed-0" / "frozen_eval.json").read_text())
    for res in results.values():
        assert res["n_index"] == 256 and res["n_query"] == 128  # the tiny demo's train and test splits
        assert 0 <= res["knn"]["balanced_accuracy"] <= 1 and res["knn"]["k"] == 20
        assert sorted(res["simpleshot"]["shots"], key=int) == ["1", "2", "4", "8", "16"]
        assert all(s["episodes"] == 100 for s in res["simpleshot"]["shots"].values())
    # the unimodal backbone is the frozen pretrained one, CLIP-IT's is tuned: two caches
    assert results["unimodal"]["feature_cache"] != results["clipit"]["feature_cache"]
    caches = sorted(p.name for p in (shards / "features").iterdir())
    assert len(caches) == 2

    def clipit_frozen():
        return cli(
            "evaluate",
            "--config",
            TINY,
            "--method",
            "clipit",
            "--seed",
            "0",
            "--frozen",
            *[a for s in sets for a in ("--set", s)],
        )

    r = clipit_frozen()
    assert r.returncode == 0 and sorted(p.name for p in (shards / "features").iterdir()) == caches  # reused
    # the record names the training it scored; once that changes (the cell trained again), it is computed again
    record = mine / "runs" / "clipit" / "seed-0" / "frozen_eval.json"
    summary = mine / "runs" / "clipit" / "seed-0" / "train_summary.json"
    assert json.loads(record.read_text())["train_summary_sha256"] == sha256_file(summary)
    old = json.loads(record.read_text())["train_summary_sha256"]
    trained = json.loads(summary.read_text())
    summary.write_text(json.dumps(trained | {"wall_s": trained["wall_s"] + 1}))  # as a retraining rewrites it
    assert clipit_frozen().returncode == 0
    assert json.loads(record.read_text())["train_summary_sha256"] == sha256_file(summary) != old


def test_an_untrained_cell_is_one_line(tmp_path):
    r = cli(
        "evaluate", "--config", TINY, "--method", "clipit", "--seed", "0", "--frozen", "--set", f"output_dir={tmp_path}"
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "clipit seed 0 is not trained" in r.stderr and "clipit train --config" in r.stderr

"""The pairing engine on real files: batched encoding, pairs meta and reruns, variants, bad images."""

import json

import numpy as np
import pytest
from pairing.fakes import make_images, make_reports, tiny_model

from clipit.corpus import CorpusError
from clipit.corpus_reader import load_reports
from clipit.data.base import DatasetError
from clipit.data.folder import ImageFolderDataset
from clipit.pairing.engine import embed_images, load_pairs, pair_dataset, read_pairs_meta
from clipit.pairing.search import topk_cosine
from clipit.pairing.texts import CONCH_TEMPLATES, class_names_for, class_prompt_texts
from clipit.shards.manifest import ShardError
from clipit.shards.writer import select_texts


@pytest.fixture()
def inputs(tmp_path):
    images = make_images(tmp_path / "images", {"train": 10, "val": 4})
    dataset = ImageFolderDataset(images, splits=("train", "val"))
    reports = load_reports(make_reports(tmp_path / "reports.jsonl"))
    return dataset, reports


def test_pairs_match_a_direct_search_and_carry_meta(inputs, tmp_path):
    dataset, reports = inputs
    model = tiny_model()
    paths = pair_dataset(model, dataset, reports, tmp_path / "pairing", top_k=3, batch_size=4, spec={"x": 1})
    text = model.encode_texts([r.text for r in reports])
    for split, path in paths.items():
        pairs = load_pairs(path)
        images = embed_images(model, dataset, split, batch_size=3)
        idx, val = topk_cosine(images, text, k=3)
        np.testing.assert_array_equal(pairs["indices"], idx)
        np.testing.assert_allclose(pairs["scores"], val, atol=1e-6)
        assert (
            pairs["keys"].tolist() == dataset.keys(split) and pairs["labels"].tolist() == dataset.labels(split).tolist()
        )
        meta = read_pairs_meta(path)
        assert meta["top_k"] == 3 and meta["spec"] == {"x": 1} and meta["model"] == model.identity


def test_rerun_skips_current_pairs_and_redoes_stale_ones(inputs, tmp_path):
    dataset, reports = inputs
    out = tmp_path / "pairing"
    paths = pair_dataset(tiny_model(), dataset, reports, out, top_k=2)
    first = {s: p.stat().st_mtime_ns for s, p in paths.items()}
    pair_dataset(tiny_model(), dataset, reports, out, top_k=2)
    assert {s: p.stat().st_mtime_ns for s, p in paths.items()} == first
    pair_dataset(tiny_model(), dataset, reports, out, top_k=4)  # another k: recomputed
    assert load_pairs(paths["train"])["indices"].shape == (10, 4)


def test_faiss_and_torch_backends_write_the_same_pairs(inputs, tmp_path):
    pytest.importorskip("faiss")
    dataset, reports = inputs
    a = pair_dataset(tiny_model(), dataset, reports, tmp_path / "a", top_k=5, search="torch")
    b = pair_dataset(tiny_model(), dataset, reports, tmp_path / "b", top_k=5, search="faiss")
    for split in dataset.splits:
        np.testing.assert_array_equal(load_pairs(a[split])["indices"], load_pairs(b[split])["indices"])


def test_class_prompts_replace_the_corpus(inputs, tmp_path):
    dataset, _ = inputs
    prompts = class_prompt_texts("bach", ("Benign", "InSitu", "Invasive", "Normal"))
    assert len(CONCH_TEMPLATES) == 22 and len(prompts) == 4 * 22
    assert prompts[22 + 19].text == "an H&E image of in situ carcinoma." and prompts[22].meta["label"] == 1
    assert class_names_for("crc", tuple("ABCDEFGHI"))[8] == "colorectal adenocarcinoma epithelium"
    assert class_names_for("folder", ("normal_mucosa", "tumor")) == ["normal mucosa", "tumor"]
    with pytest.raises(CorpusError, match="one name per class"):
        class_names_for("pcam", ("normal", "tumor"), ["only one"])
    texts = class_prompt_texts(dataset.name, dataset.classes)
    paths = pair_dataset(tiny_model(), dataset, texts, tmp_path / "pairing", top_k=1)
    assert load_pairs(paths["train"])["indices"].max() < len(texts)


def test_kth_best_and_random_selection():
    pairs = {"indices": np.array([[4, 2, 7], [1, 0, 3]]), "scores": np.array([[0.9, 0.8, 0.7], [0.5, 0.4, 0.3]])}
    idx, score = select_texts(pairs, "train", use_rank=2)
    assert idx.tolist() == [2, 0] and score.tolist() == pytest.approx([0.8, 0.4])
    with pytest.raises(ShardError, match="pairing.top_k >= 4"):
        select_texts(pairs, "train", use_rank=4)
    big = {"indices": np.zeros((1000, 1), dtype=np.int64), "scores": np.zeros((1000, 1))}
    r1, s1 = select_texts(big, "train", random_seed=5, num_texts=50)
    r2, _ = select_texts(big, "train", random_seed=5, num_texts=50)
    r3, _ = select_texts(big, "val", random_seed=5, num_texts=50)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(r1, r3) and np.isnan(s1).all() and 0 <= r1.min() and r1.max() < 50
    assert len(np.unique(r1)) > 40  # uniform over the corpus, not the retrieved ones


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_one_line_naming_the_file(inputs, workers):
    dataset, _ = inputs
    bad = dataset.root / "train" / "tumor" / "train_0003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DatasetError) as err:
        embed_images(tiny_model(), dataset, "train", batch_size=4, num_workers=workers)
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "cannot decode image" in message
    assert json.dumps(message)  # printable as one line

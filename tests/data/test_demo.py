"""Demo data generators and the demo CLIP (fast: a few seconds on 2 CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipit.data import demo
from clipit.data.demo import DEMO_CLASSES, render_patches, write_demo_images
from clipit.data.demo_text import make_captions, make_paired_set, make_reports, write_reports_jsonl

COUNTS = {"train": 40, "val": 8, "test": 12}


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_classes_sorted_so_folder_order_is_label_order():
    assert list(DEMO_CLASSES) == sorted(DEMO_CLASSES) and len(DEMO_CLASSES) == 4


def test_render_shapes_dtype_and_determinism():
    labels = np.arange(12) % 4
    a = render_patches(labels, 64, _rng(3))
    assert a.shape == (12, 64, 64, 3) and a.dtype == np.uint8
    assert a.tobytes() == render_patches(labels, 64, _rng(3)).tobytes()
    assert a.tobytes() != render_patches(labels, 64, _rng(4)).tobytes()
    assert render_patches(np.array([0, 3]), 32, _rng(0)).shape == (2, 32, 32, 3)


def test_patches_look_like_he_and_classes_differ():
    per = 40
    labels = np.repeat(np.arange(4), per)
    x = render_patches(labels, 64, _rng(1)).astype(np.float32)
    r, g = x[..., 0], x[..., 1]
    # Pink eosin background: red above green on average, in every class.
    assert (r.mean((1, 2)) > g.mean((1, 2)) + 20).all()
    # Hematoxylin fraction per class, by colour deconvolution onto the H and E optical-density vectors.
    od = -np.log((x + 1) / 256)
    h_e = od @ np.linalg.pinv(np.array([[0.65, 0.70, 0.29], [0.10, 0.85, 0.40]]))
    hema = (h_e[..., 0] > 0.5).mean((1, 2)).reshape(4, per).mean(1)
    lumen = (x.min(-1) > 215).mean((1, 2)).reshape(4, per).mean(1)  # white gland lumens
    lym, muc, stroma, tumor = (DEMO_CLASSES.index(c) for c in ("lymphocytes", "normal_mucosa", "stroma", "tumor"))
    assert hema[lym] > 3 * hema[stroma] and hema[tumor] > 3 * hema[stroma] and hema[muc] > 2 * hema[stroma]
    assert lumen[muc] > 5 * max(lumen[lym], lumen[stroma], lumen[tumor])


def test_reports_vocabulary_ids_and_noise():
    reports = make_reports(200, seed=1)
    assert len(reports) == 200 and reports == make_reports(200, seed=1)
    assert reports != make_reports(200, seed=2)
    ids = [r["id"] for r in reports]
    assert len(set(ids)) == 200 and ids[0] == "DEMO-R0001"
    assert {r["organ"] for r in reports} == {"colon"}
    counts = {c: sum(r["demo_class"] == c for r in reports) for c in DEMO_CLASSES}
    assert set(counts.values()) == {50}
    assert len({r["text"] for r in reports}) == 200
    keys = {
        "tumor": ("pleomorphic", "carcinoma", "crowd"),
        "lymphocytes": ("lymph",),
        "stroma": ("spindle", "fibrous", "fibros", "collagen"),
        "normal_mucosa": ("crypt", "gland", "mucosa"),
    }
    for r in reports:
        head = " ".join(r["text"].split()[:40]).lower()  # the class evidence sits before text-encoder truncation
        assert any(k in head for k in keys[r["demo_class"]]), r["text"]
        assert len(r["text"].split()) > 60  # boilerplate after the findings
    noisy = sum(" Also " in r["text"] for r in reports) / len(reports)
    assert 0.05 < noisy < 0.3
    assert sum("adenocarcinoma" in r["text"] for r in reports) > 10  # real CAP histology terms are used


def test_captions_and_paired_set():
    caps = make_captions(np.arange(8) % 4, _rng(0))
    assert len(caps) == 8 and all(isinstance(c, str) and 3 < len(c.split()) < 30 for c in caps)
    x, y, c = make_paired_set(16, 64, seed=0)
    x2, y2, c2 = make_paired_set(16, 64, seed=0)
    assert x.shape == (16, 64, 64, 3) and x.dtype == np.uint8 and len(c) == 16
    assert x.tobytes() == x2.tobytes() and (y == y2).all() and c == c2
    assert np.bincount(y, minlength=4).tolist() == [4, 4, 4, 4]


def test_write_reports_jsonl(tmp_path):
    reports = make_reports(9, seed=0)
    p = write_reports_jsonl(tmp_path / "r" / "reports.jsonl", reports)
    assert [json.loads(line) for line in p.read_text().splitlines()] == reports
    assert [f.name for f in p.parent.iterdir()] == ["reports.jsonl"]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_demo_images_layout_balance_determinism(tmp_path):
    from clipit.data.folder import ImageFolderDataset

    root = write_demo_images(tmp_path / "a", COUNTS, size=32, seed=5)
    ds = ImageFolderDataset(root)
    assert ds.classes == DEMO_CLASSES
    for split, n in COUNTS.items():
        assert ds.split_size(split) == n
        assert np.bincount(ds.labels(split), minlength=4).max() - np.bincount(ds.labels(split), minlength=4).min() <= 1
    assert (root / "train" / "tumor").is_dir() and next((root / "val").rglob("val_0000*.png"))
    assert _tree(root) == _tree(write_demo_images(tmp_path / "b", COUNTS, size=32, seed=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp dirs left


def test_write_demo_images_resume_rebuild_and_atomic(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    write_demo_images(root, COUNTS, size=32, seed=0)
    (root / "sentinel").write_text("x")
    write_demo_images(root, COUNTS, size=32, seed=0)  # same request: skipped
    assert (root / "sentinel").exists()
    before = _tree(root)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "render_patches", boom)
    with pytest.raises(RuntimeError):
        write_demo_images(root, COUNTS, size=32, seed=1)  # rebuild fails half way
    assert _tree(root) == before  # old data intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # and no partial folder left
    monkeypatch.undo()

    write_demo_images(root, COUNTS, size=32, seed=1)  # different request: replaced
    assert not (root / "sentinel").exists()
    assert json.loads((root / "demo_meta.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_demo_clip_trains_saves_and_loads(tmp_path):
    import torch
    from PIL import Image

    from clipit.pairing.demo_clip import _forward_trimmed, load_demo_clip, train_demo_clip

    x, _, caps = make_paired_set(16, 64, seed=0)
    out = tmp_path / "clip"
    ckpt = train_demo_clip(x, caps, out, seconds=30, seed=0, batch_size=8, max_steps=2)
    ident = json.loads((out / "identity.json").read_text())
    assert ckpt == out / "model.safetensors" and ckpt.is_file()
    assert ident["name"] == "clipit-demo-clip" and ident["steps"] == 2 and ident["config"]["embed_dim"] == 512
    assert len(ident["sha256"]) == 64
    mtime = ckpt.stat().st_mtime_ns
    assert train_demo_clip(x, caps, out, seconds=30, max_steps=2) == ckpt and ckpt.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.iterdir()) == ["identity.json", "model.safetensors"]

    model, preprocess, tokenizer = load_demo_clip(ckpt)
    assert not model.training
    reports = make_reports(4, seed=1)
    with torch.no_grad():
        t = tokenizer([r["text"] for r in reports])
        assert t.shape == (4, 77)
        u = model.encode_text(t)
        v = model.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in x[:3]]))
        assert u.shape == (4, 512) and v.shape == (3, 512)
        # The trimmed-token training forward equals the ordinary forward (causal mask + EOT pooling).
        short = tokenizer(caps[:3])
        _, full_t, _ = model(None, short)
        _, trim_t, _ = _forward_trimmed(model, None, short)
        assert torch.allclose(full_t, trim_t, atol=1e-5)
        # preprocess on a 64-px image = the tensor conversion used in training
        from clipit.pairing.demo_clip import _to_tensor

        assert torch.allclose(preprocess(Image.fromarray(x[0])), _to_tensor(x[:1])[0], atol=1e-5)

"""The reference profile (configs/grids/base/paper_strict.yaml) switch by switch, each against a hand
computation of what the authors' code (BanafshehKarimian/ModalityPairing) does: the fused forward, the
double-softmax loss, the epoch-stepped cosine, whitespace-preserving tokens, the imported pairings
(npy files written here like theirs), and a short train with the switches on."""

from __future__ import annotations

import math
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from clipit.config import TrainConfig, load_config
from clipit.corpus_reader import load_reports
from clipit.data.bach import BACHDataset
from clipit.data.crc import CRC_CLASSES, CRCDataset
from clipit.data.pcam import PCamDataset
from clipit.models.clipit import ClipItModel, clipit_loss
from clipit.models.preprocess import DevicePreprocess
from clipit.pairing.engine import import_reference_pairs
from clipit.pairing.reference import ReferencePairsError, map_reference_pairs
from clipit.training.trainer import make_scheduler
from clipit_testing import ROOT, cli, train_args

# ------------------------------------------------------------------------------------------ forward + loss


class Identity(nn.Module):
    num_features = 2

    def forward(self, x):
        return x


def set_linear(layer: nn.Linear, weight, bias) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def hand_model() -> ClipItModel:
    model = ClipItModel(Identity(), num_classes=2, text_dim=2, kd_layers=1)
    set_linear(model.head, [[1, 0], [0, 2]], [0, 1])  # W_v
    set_linear(model.proj, [[1, 1], [0, -1]], [0, 0])  # P
    set_linear(model.text_head[0], [[1, 0], [0, 1]], [0, 0])  # H_t: Linear, LeakyReLU(0.1), Linear
    set_linear(model.text_head[2], [[2, 0], [1, 1]], [0, 0])
    set_linear(model.fuse, [[1, 0, 1, 0], [0, 1, 0, -1]], [0, 0])  # F
    return model


def test_fused_forward_and_double_softmax_loss_by_value():
    """e = [3, 10]: W_v e = [3, 21], P e = [13, -10] -> H_t -> [26, 12], F -> z = [29, 9] (as the
    reference's FuserModel.forward). Its loss: CE(softmax(z)) + lam (1 - cos(P e, t))."""
    out = hand_model()(torch.tensor([[3.0, 10.0]]))
    torch.testing.assert_close(out["logits"], torch.tensor([[29.0, 9.0]]))
    t = torch.tensor([[1.0, 0.0]])
    kd = 1 - 13 / math.sqrt(13**2 + 10**2)
    p0 = 1 / (1 + math.exp(-20))  # softmax(z)_0, then CE over [p0, 1 - p0]: log(1 + exp(-(p0 - p1)))
    double = math.log(1 + math.exp(-(2 * p0 - 1)))
    strict = clipit_loss(out, torch.tensor([0]), t, lam=1.0, ce_input="softmax")
    assert strict["ce"].item() == pytest.approx(double, rel=1e-6)
    assert strict["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert strict["loss"].item() == pytest.approx(double + kd, rel=1e-6)
    plain = clipit_loss(out, torch.tensor([0]), t, lam=1.0)
    assert plain["ce"].item() == pytest.approx(math.log(1 + math.exp(-20)), abs=1e-8)
    # a confident right answer still costs log(1 + 1/e) under the double softmax: the CE term never falls
    # below it, so lam = 1 weighs the distillation against a CE confined to [0.313, 1.313] for 2 classes
    assert double == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    wrong = clipit_loss(out, torch.tensor([1]), t, lam=0.0, ce_input="softmax")["loss"].item()
    assert wrong == pytest.approx(math.log(1 + math.e), rel=1e-6)


# ------------------------------------------------------------------------------------------- schedule


def lrs(tcfg: TrainConfig, steps: int, batches_per_epoch: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=tcfg.lr)
    sched = make_scheduler(tcfg, opt, steps, batches_per_epoch)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_epochs_is_cosine_annealing_stepped_once_per_epoch():
    """Lightning steps the reference's CosineAnnealingLR(T_max, eta_min) at each epoch end."""
    tcfg = TrainConfig(lr=1e-3, min_lr=1e-4, schedule="cosine_epochs", t_max=4)
    ours = lrs(tcfg, steps=3 * 7, batches_per_epoch=3)
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-3)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=1e-4)
    reference = []
    for _ in range(7):  # epochs
        reference += [opt.param_groups[0]["lr"]] * 3
        opt.step()
        torch_sched.step()
    np.testing.assert_allclose(ours, reference, rtol=1e-9)
    # by hand: epoch 2 of T_max 4 is half way: (1e-3 + 1e-4) / 2
    assert ours[6] == pytest.approx(5.5e-4)


def test_reference_t_max_is_an_effectively_constant_lr():
    strict = lrs(TrainConfig(lr=1e-3, schedule="cosine_epochs", t_max=12500), steps=30, batches_per_epoch=10)
    assert strict[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(2 * math.pi / 12500)))
    assert min(strict) / 1e-3 > 1 - 1e-7  # three epochs: the lr moves by less than 1e-7
    ours = lrs(TrainConfig(lr=1e-3, schedule="cosine"), steps=30, batches_per_epoch=10)
    assert ours[-1] < 1e-5  # our cosine decays over the run


# ------------------------------------------------------------------------------------------ augmentation


def test_flips_jitter_matches_torchvision_color_jitter_per_sample():
    from torchvision.transforms import v2

    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    pre = DevicePreprocess(8, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    out = pre(images, augment="flips_jitter", generator=torch.Generator().manual_seed(3))
    plain = pre(images)
    assert out.shape == plain.shape and not torch.equal(out, plain)
    assert out.min() >= 0 and out.max() <= 1
    # flips only: the same draws, jitter factors of one (ColorJitter with all ranges 0 is the identity)
    from clipit.models import preprocess

    flipped = preprocess.random_flips(plain, torch.Generator().manual_seed(5))
    again = preprocess.random_flips(plain, torch.Generator().manual_seed(5))
    assert torch.equal(flipped, again)
    assert all(
        torch.equal(f, p)
        or torch.equal(f, p.flip(-1))
        or torch.equal(f, p.flip(-2))
        or torch.equal(f, p.flip(-1).flip(-2))
        for f, p in zip(flipped, plain)
    )
    # one image, one order: our jitter equals torchvision's functional ops in that order
    x = plain[:1]
    gen = torch.Generator().manual_seed(11)
    ours = preprocess.color_jitter(x, gen)
    gen = torch.Generator().manual_seed(11)
    order = torch.argsort(torch.rand((1, 4), generator=gen), dim=1)[0].tolist()
    f = torch.rand((1, 4), generator=gen)[0]
    factors = [0.5 + f[0].item(), 0.5 + f[1].item(), 0.5 + f[2].item(), -0.05 + 0.1 * f[3].item()]
    ops = [
        v2.functional.adjust_brightness,
        v2.functional.adjust_contrast,
        v2.functional.adjust_saturation,
        v2.functional.adjust_hue,
    ]
    expected = x[0]
    for i in order:
        expected = ops[i](expected, factors[i])
    torch.testing.assert_close(ours[0], expected)


# ------------------------------------------------------------------------------------------ tokens


def tokenizer():
    try:
        from clipit.pairing.encoders import conch_tokenizer

        return conch_tokenizer()
    except Exception:  # conch-fork missing: the byte-level stand-in of the pairing tests
        from pairing.fakes import tiny_tokenize

        return tiny_tokenize


def test_txt_corpus_keeps_whitespace_and_tokens_match_the_reference(tmp_path):
    lines = ["Invasive  ductal\tcarcinoma,\u00a0grade 2.  \n", "\n", "Margins: negative.   Nodes 0/3.\n"]
    path = tmp_path / "text_breast.txt"
    path.write_text("".join(lines))
    reports = load_reports(path)
    assert [r.id for r in reports] == ["text_breast-0", "text_breast-2"]  # ids keep the line index
    reference = [line.rstrip() for line in open(path)]  # the reference's reading
    assert [r.text for r in reports] == [reference[0], reference[2]]
    tokenize = tokenizer()
    ours = tokenize([r.text for r in reports])
    assert torch.equal(ours, tokenize([reference[0], reference[2]]))
    collapsed = load_reports(path, whitespace="collapse")
    assert collapsed[0].text == "Invasive ductal carcinoma, grade 2."
    assert not torch.equal(tokenize([r.text for r in collapsed]), ours)


# ------------------------------------------------------------------------------------------ pairings


def write_corpus(path: Path, n: int, blank: tuple[int, ...] = ()) -> list:
    path.write_text("".join("\n" if i in blank else f"report number {i}\n" for i in range(n)))
    return load_reports(path)


def write_pcam(root: Path, sizes: dict[str, int]) -> PCamDataset:
    rng = np.random.default_rng(0)
    for split, file_split in (("train", "train"), ("val", "valid"), ("test", "test")):
        n = sizes[split]
        with h5py.File(root / f"camelyonpatch_level_2_split_{file_split}_x.h5", "w") as f:
            f["x"] = rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8)
        with h5py.File(root / f"camelyonpatch_level_2_split_{file_split}_y.h5", "w") as f:
            f["y"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
    return PCamDataset(root, expected_sizes=sizes)


def text_of(reports, pairs, split) -> list[str]:
    return [reports[i].id for i in pairs[split][0][:, 0]]


def test_pcam_indices_map_in_torchvision_order(tmp_path):
    sizes = {"train": 6, "val": 4, "test": 4}
    dataset = write_pcam(tmp_path, sizes)
    reports = write_corpus(tmp_path / "text_breast.txt", 9, blank=(8,))
    ref = tmp_path / "Paired_indexes"
    ref.mkdir()
    lines = {s: (np.arange(n) * 3 + len(s)) % 8 for s, n in sizes.items()}  # any line but the blank one
    for split, values in lines.items():
        np.save(ref / f"pcam_{split}_indexes.npy", values)
    np.save(ref / "pcam_test_values.npy", np.linspace(0.1, 0.4, 4))
    pairs = map_reference_pairs(dataset, reports, tmp_path / "text_breast.txt", ref)
    for split, values in lines.items():
        assert text_of(reports, pairs, split) == [f"text_breast-{j}" for j in values]
        assert pairs[split][0].shape == (sizes[split], 1)
    assert np.isnan(pairs["train"][1]).all()
    np.testing.assert_allclose(pairs["test"][1][:, 0], np.linspace(0.1, 0.4, 4), rtol=1e-6)


def _tif(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, 0, 0)).save(path)


def test_crc_indices_follow_evas_sorted_pool_over_the_full_train_folder(tmp_path):
    for folder, per_class in (("NCT-CRC-HE-100K", 5), ("CRC-VAL-HE-7K", 2)):
        for label, cls in enumerate(CRC_CLASSES):
            for i in range(per_class):
                _tif(tmp_path / folder / cls / f"{cls}-{'ZYXWV'[i]}{label}.tif", i)
    dataset = CRCDataset(tmp_path, expected_sizes={})
    # eva's CRC order, as torchvision's make_dataset lists it: class folders sorted, file names sorted
    eva_train = [
        f"NCT-CRC-HE-100K/{c}/{n.stem}"
        for c in sorted(CRC_CLASSES)
        for n in sorted((tmp_path / "NCT-CRC-HE-100K" / c).iterdir())
    ]
    eva_val = [
        f"CRC-VAL-HE-7K/{c}/{n.stem}"
        for c in sorted(CRC_CLASSES)
        for n in sorted((tmp_path / "CRC-VAL-HE-7K" / c).iterdir())
    ]
    reports = write_corpus(tmp_path / "text_colo.txt", 50)
    line = {key: hash(key) % 50 for key in eva_train + eva_val}
    ref = tmp_path / "ref"
    ref.mkdir()
    np.save(ref / "crc_train_indexes.npy", np.array([line[k] for k in eva_train]))
    np.save(ref / "crc_val_indexes.npy", np.array([line[k] for k in eva_val], dtype=np.int32))
    pairs = map_reference_pairs(dataset, reports, tmp_path / "text_colo.txt", ref)
    for split in ("train", "val", "test"):
        assert text_of(reports, pairs, split) == [f"text_colo-{line[k]}" for k in dataset.keys(split)]


def test_bach_2d_indices_map_through_evas_ranges(tmp_path):
    photos = tmp_path / "ICIAR2018_BACH_Challenge" / "Photos"
    prefix = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}
    for cls, p in prefix.items():
        for i in range(1, 101):
            _tif(photos / cls / f"{p}{i:03d}.tif", i)
    dataset = BACHDataset(tmp_path)
    ordered = [f"{c}/{n.stem}" for c in sorted(prefix) for n in sorted((photos / c).iterdir())]  # eva's listing
    ranges = {  # eva's patient-aware split of the 400 sorted photos (kaiko-ai/eva bach.py)
        "train": [(0, 41), (59, 60), (90, 139), (169, 240), (258, 260), (273, 345), (368, 400)],
        "val": [(41, 59), (60, 90), (139, 169), (240, 258), (260, 273), (345, 368)],
    }
    reports = write_corpus(tmp_path / "text.txt", 400)
    ref = tmp_path / "ref"
    ref.mkdir()
    for split, spans in ranges.items():
        keys = [ordered[i] for a, b in spans for i in range(a, b)]
        column = np.array([ordered.index(k) for k in keys])  # photo index = line index, per image
        np.save(ref / f"bach_{split}_indexes.npy", np.stack([column, (column + 1) % 400], axis=1))  # [N, k]
    pairs = map_reference_pairs(dataset, reports, tmp_path / "text.txt", ref)
    assert {s: len(pairs[s][0]) for s in pairs} == {"train": 254, "val": 14, "test": 132}
    for split in ("train", "val", "test"):
        assert text_of(reports, pairs, split) == [f"text-{ordered.index(k)}" for k in dataset.keys(split)]


@pytest.fixture
def pcam_case(tmp_path):
    sizes = {"train": 4, "val": 2, "test": 2}
    dataset = write_pcam(tmp_path, sizes)
    reports = write_corpus(tmp_path / "text_breast.txt", 5, blank=(3,))
    ref = tmp_path / "ref"
    ref.mkdir()
    for split, n in sizes.items():
        np.save(ref / f"pcam_{split}_indexes.npy", np.zeros(n, dtype=np.int64))
    return dataset, reports, tmp_path / "text_breast.txt", ref


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda ref: (ref / "pcam_val_indexes.npy").unlink(), "pcam_val_indexes.npy: missing"),
        (
            lambda ref: np.save(ref / "pcam_train_indexes.npy", np.zeros(5, dtype=np.int64)),
            "5 entries but the split it pairs has 4",
        ),
        (lambda ref: np.save(ref / "pcam_train_indexes.npy", np.array([0, 1, 2, 5])), "line index 5 is outside"),
        (lambda ref: np.save(ref / "pcam_train_indexes.npy", np.array([0, 1, 2, -1])), "line index -1 is outside"),
        (lambda ref: np.save(ref / "pcam_train_indexes.npy", np.array([0, 3, 0, 0])), "line 4 of"),
        (lambda ref: np.save(ref / "pcam_train_indexes.npy", np.zeros(4)), "expected integer line indices"),
        (
            lambda ref: np.save(ref / "pcam_train_indexes.npy", np.array([None] * 4, dtype=object)),
            "not a numpy index array",
        ),
        (lambda ref: np.save(ref / "pcam_val_values.npy", np.array([0.1, np.nan])), "non-finite similarities"),
    ],
)
def test_bad_reference_files_are_one_line_errors(pcam_case, damage, message):
    dataset, reports, corpus, ref = pcam_case
    damage(ref)
    with pytest.raises(ReferencePairsError, match=message) as err:
        map_reference_pairs(dataset, reports, corpus, ref)
    assert "\n" not in str(err.value)


def test_imported_pairs_are_current_pairs_files(pcam_case, tmp_path):
    from pairing.fakes import tiny_model

    from clipit.pairing.engine import current_pairs, load_pairs, pairing_spec

    dataset, reports, corpus, ref = pcam_case
    config = tmp_path / "strict.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "run"),
                "data": {"name": "pcam", "root": str(tmp_path), "expected_sizes": {"train": 4, "val": 2, "test": 2}},
                "reports": {"path": str(corpus)},
                "pairing": {"model": "conch", "from_reference": str(ref)},
            }
        )
    )
    cfg = load_config(config)
    paths = import_reference_pairs(tiny_model, dataset, reports, corpus, ref, cfg.pairing.dir, 8, pairing_spec(cfg))
    assert current_pairs(cfg, dataset, reports) == paths
    pairs = load_pairs(paths["train"])
    assert pairs["indices"].shape == (4, 1) and list(pairs["keys"]) == dataset.keys("train")
    np.save(ref / "pcam_train_indexes.npy", np.ones(4, dtype=np.int64))  # other files: no longer current
    assert current_pairs(cfg, dataset, reports) is None


def test_from_reference_config_errors_name_the_key(tmp_path):
    base = {"output_dir": str(tmp_path), "data": {"name": "pcam", "root": str(tmp_path)}}
    cases = [
        ({"reports": {"path": "r.csv"}, "pairing": {"from_reference": "ref"}}, "format txt"),
        ({"reports": {"path": "r.txt"}, "pairing": {"from_reference": "ref", "top_k": 2}}, "pairing.top_k: 1"),
        (
            {"reports": {"path": "r.txt", "projects": ["BRCA"]}, "pairing": {"from_reference": "ref"}},
            "reports.projects",
        ),
    ]
    for sections, message in cases:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(base | sections))
        proc = cli("pair", "--config", str(path))
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_from_reference_flag_reports_a_missing_folder(pcam_case, tmp_path):
    dataset, reports, corpus, ref = pcam_case
    config = tmp_path / "strict.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "run"),
                "data": {"name": "pcam", "root": str(tmp_path), "expected_sizes": {"train": 4, "val": 2, "test": 2}},
                "reports": {"path": str(corpus)},
                "pairing": {"model": "conch", "checkpoint": str(tmp_path / "never-loaded.bin")},
            }
        )
    )
    proc = cli("pair", "--config", str(config), "--from-reference", str(tmp_path / "nowhere"))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the corpus's warning about the blank line
    assert "nowhere: folder not found; set pairing.from_reference" in last and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ configs + training


def test_strict_profile_sets_every_reference_switch():
    cfg = load_config(ROOT / "configs/grids/base/paper_strict.yaml")
    assert cfg.reports.format == "txt" and cfg.reports.whitespace == "keep" and cfg.pairing.top_k == 1
    assert cfg.model.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    for name, m in cfg.methods.items():
        assert (m.precision, m.ce_input) == ("fp32", "softmax"), name
    assert [cfg.methods[m].schedule for m in ("unimodal", "text", "clipit")] == [
        "cosine_epochs",
        "cosine_epochs",
        "none",
    ]
    assert cfg.methods["clipit"].augment_policy == "flips_jitter"
    assert cfg.methods["late_fusion"].text_encoder == "tower"  # the reference's LoRA'd text model


def test_strict_table1_grid_dry_runs_and_its_cells_are_the_reference_recipe(monkeypatch):
    from clipit.hpc.grid import expand

    proc = cli("grid", "--config", "configs/grids/paper_table1_strict.yaml", "--dry-run", "--no-preflight")
    assert proc.returncode == 0, proc.stderr
    assert "total (219 stages)" in proc.stdout  # 216 cells + pairing and shards of 3 datasets
    monkeypatch.chdir(ROOT)
    plan = expand(ROOT / "configs/grids/paper_table1_strict.yaml")
    assert len(plan.cells) == 216 and len(plan.tasks) == 54
    sample = plan.cells[::13]  # 17 cells: the stride walks across methods, datasets and backbones
    assert {c.labels["dataset"] for c in sample} == {"pcam", "bach", "crc"} and len({c.method for c in sample}) == 4
    for cell in sample:
        cfg = cell.load()
        dataset = cell.labels["dataset"]
        assert cfg.reports.path.endswith("text_colo.txt" if dataset == "crc" else "text_breast.txt")
        assert (cfg.model.mean is not None) == (dataset == "pcam")
        m = cfg.methods[cell.method]
        assert (m.ce_input, m.precision) == ("softmax", "fp32")
        if cell.method != "text":
            assert m.augment == (dataset == "pcam")


@pytest.mark.slow  # two in-process trains, ~20 s on 2 cores
def test_strict_switches_train_a_tiny_model(tiny_shards, tmp_path):
    """The probe with the epoch-stepped cosine, double softmax, fp32, flips + jitter and other statistics,
    then CLIP-IT without LoRA and with a trainable head, warm-started from it."""
    from safetensors.torch import load_file

    from clipit import layout

    strict = [
        "model.mean=[0.48145466, 0.4578275, 0.40821073]",
        "model.std=[0.26862954, 0.26130258, 0.27577711]",
    ]
    probe = [
        "methods.unimodal.epochs=0.5",
        "methods.unimodal.schedule=cosine_epochs",
        "methods.unimodal.ce_input=softmax",
        "methods.unimodal.augment=true",
        "methods.unimodal.augment_policy=flips_jitter",
        "methods.unimodal.feature_cache=false",
    ]
    proc = cli(*train_args(tmp_path, tiny_shards, *strict, *probe, method="unimodal"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fuser = [
        "model.lora.enabled=false",
        "methods.clipit.train_head=true",
        "methods.clipit.ce_input=softmax",
        "methods.clipit.evals_per_epoch=1",
        "methods.clipit.epochs=0.5",
    ]
    proc = cli(*train_args(tmp_path, tiny_shards, *strict, *probe, *fuser, method="clipit"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warm = load_file(str(layout.run_dir(tmp_path, "unimodal", 0) / "best.safetensors"))
    tuned = load_file(str(layout.run_dir(tmp_path, "clipit", 0) / "best.safetensors"))
    assert not any("lora_" in k for k in tuned)
    assert not torch.equal(warm["head.weight"], tuned["head.weight"])  # the head trained
    backbone = [k for k in warm if k.startswith("backbone.")]
    assert backbone and all(torch.equal(warm[k], tuned[k]) for k in backbone)  # the backbone did not


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["methods.clipit.train_head=true"], "methods.clipit.train_head is for a frozen backbone"),
        (["model.mean=[0.5, 0.5, 0.5]"], "set model.mean and model.std together"),
        (["model.mean=[0.5, 0.5]", "model.std=[0.5, 0.5, 0.5]"], "model.mean = [0.5, 0.5] must have at least 3 items"),
        (["model.std=[0.5, 0.5, 0.5, 0.5]", "model.mean=[0.5, 0.5, 0.5]"], "must have at most 3 items"),
        (["model.std=[0.5, 0.0, 0.5]", "model.mean=[0.5, 0.5, 0.5]"], "model.std[1] = 0.0 is out of range"),
        (["methods.unimodal.schedule=cosine_epochs", "methods.unimodal.t_max=0"], "methods.unimodal.t_max = 0"),
        (["methods.clipit.ce_input=probabilities"], "methods.clipit.ce_input = 'probabilities' is not one of"),
        (["reports.whitespace=strip"], "reports.whitespace = 'strip' is not one of"),
    ],
)
def test_strict_switches_are_validated_at_load(overrides, message):
    from clipit.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs/demo-tiny.yaml", overrides)

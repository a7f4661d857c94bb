"""`clipit report` (clipit/results/report.py, clipit/results/plots.py) on synthetic run directories laid out like a grid."""

import csv
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from clipit.results.multimodal_tables import omega
from clipit.results.report import build_report
from clipit.results.runs import find_runs
from clipit_testing import ROOT

BACKBONES = ["uni", "kaiko-vits16", "kaiko-vits8", "kaiko-vitb16", "kaiko-vitb8", "kaiko-vitl14"]
PARAMS = {
    "uni": 303e6,
    "kaiko-vits16": 21.7e6,
    "kaiko-vits8": 21.7e6,
    "kaiko-vitb16": 85.8e6,
    "kaiko-vitb8": 85.8e6,
    "kaiko-vitl14": 304e6,
}
N_TEST = 200


def make_run(
    root: Path,
    backbone: str,
    dataset: str,
    method: str,
    kind: str,
    seed: int,
    acc: float,
    variant: str | None = None,
    correct: np.ndarray | None = None,
    tb: bool = False,
) -> Path:
    """A finished run: config.yaml, metrics.json, predictions-test.npz (+ state.json for grid cells)."""
    out = root / dataset / (backbone if variant is None else f"{backbone}-ablations/{variant}")
    run = out / "runs" / method / f"seed-{seed}"
    run.mkdir(parents=True)
    method_cfg = {"method": kind} | ({"warm_start": "unimodal"} if kind == "clipit" else {})
    cfg = {"model": {"backbone": backbone}, "data": {"name": dataset}, "methods": {method: method_cfg}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    extra = 0.02 * PARAMS[backbone] if kind == "clipit" else 0
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "method": method,
                "balanced_accuracy": acc,
                "accuracy": acc,
                "parameters": {"total": PARAMS[backbone] + extra},
            }
        )
    )
    labels = np.arange(N_TEST) % 2
    if correct is None:
        correct = np.random.default_rng(zlib.crc32(f"{backbone}/{dataset}/{kind}/{seed}".encode())).random(N_TEST) < acc
    preds = np.where(correct, labels, 1 - labels)
    logits = np.stack([preds == 0, preds == 1], axis=1).astype(np.float32)
    keys = np.array([f"test_{i:08d}" for i in range(N_TEST)])
    order = np.random.default_rng(seed + 7).permutation(N_TEST)  # matching must go by key, not position
    np.savez(run / "predictions-test.npz", keys=keys[order], labels=labels[order], logits=logits[order])
    if variant is not None or kind == "text":
        axes = {"backbone": backbone, "dataset": dataset} | ({"ablation": variant} if variant else {})
        (run / "state.json").write_text(
            json.dumps({"state": "done", "cell": {"axes": axes, "method": method, "seed": seed, "kind": kind}})
        )
    if tb:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out / "tb" / method / f"seed-{seed}")) as writer:
            for step in range(10, 110, 10):
                writer.add_scalar("train/loss", 2.0 / (1 + step / 30) + 0.05 * seed, step)
                writer.add_scalar("val/balanced_accuracy", acc - 0.2 / (1 + step / 20), step)
    return run


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    rng = np.random.default_rng(0)
    for d, base in (("pcam", 0.88), ("bach", 0.80), ("crc", 0.94)):
        for b_i, b in enumerate(BACKBONES):
            for seed in range(3):
                uni = base + 0.01 * b_i + 0.003 * seed
                make_run(root, b, d, "unimodal", "unimodal", seed, uni, tb=(d == "pcam" and seed < 2))
                make_run(root, b, d, "clipit", "clipit", seed, uni + 0.02 + 0.001 * seed, tb=(d == "pcam" and seed < 2))
        for seed in range(3):
            make_run(root, "uni", d, "text", "text", seed, 0.6 + 0.01 * rng.random())
    for variant, acc in (("no-lora", 0.9386), ("no-text", 0.9431)):
        for seed in range(3):
            make_run(root, "uni", "pcam", "clipit", "clipit", seed, acc + 0.001 * seed, variant=variant, tb=seed < 2)
            link = root / "pcam" / "uni-ablations" / variant / "runs" / "unimodal"
            link.mkdir(parents=True, exist_ok=True)
            os.symlink(root / "pcam" / "uni" / "runs" / "unimodal" / f"seed-{seed}", link / f"seed-{seed}")
    failed = root / "crc" / "uni-ablations" / "late" / "runs" / "clipit" / "seed-0"
    failed.mkdir(parents=True)
    (failed / "state.json").write_text(
        json.dumps({"state": "failed", "job_id": "7_1", "error": "Traceback\nRuntimeError: CUDA out of memory"})
    )
    return root, build_report(root)


def test_runs_are_found_once(paper_runs):
    root, result = paper_runs
    runs, states = find_runs(root)
    assert result["runs"] == len(runs) == 3 * 6 * 2 * 3 + 3 * 3 + 2 * 3  # linked probes not counted again
    assert [s["state"] for s in states] == ["failed"]


def test_table1_mean_std_delta(paper_runs):
    root, result = paper_runs
    rows = {(r["backbone"], r["dataset"]): r for r in result["table1"] if r["backbone"] != "mean gain"}
    assert len(rows) == 18
    uni = rows[("uni", "pcam")]
    assert uni["unimodal_mean"] == pytest.approx(np.mean([0.88, 0.883, 0.886]))
    assert uni["unimodal_std"] == pytest.approx(np.std([0.88, 0.883, 0.886], ddof=1))
    assert uni["delta"] == pytest.approx(0.021) and uni["clipit_n"] == 3
    md = (root / "report" / "report.md").read_text()
    assert "| UNI | 88.30 ± 0.30 | 90.40 ± 0.40 | +2.10 | 80.30 ± 0.30 |" in md
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = lines[0]
    assert header.startswith("| Vision backbone | PCAM Unimodal | PCAM CLIP-IT | PCAM Δ | BACH Unimodal")
    assert [line.split(" | ")[0] for line in lines[1:7]] == [
        "| UNI",
        "| DINO (ViT-L/14)",
        "| VITB-16",
        "| VITS-16",
        "| VITB-8",
        "| VITS-8",
    ]
    with open(root / "report" / "table1.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 18 + 3  # + the mean-gain row per dataset
    uni_pcam = next(r for r in table if r["backbone"] == "uni" and r["dataset"] == "pcam")
    assert float(uni_pcam["delta_pct"]) == pytest.approx(2.1)  # percent, and the column says so
    gain = {r["dataset"]: r for r in result["table1"] if r["backbone"] == "mean gain"}
    assert gain["pcam"]["delta"] == pytest.approx(0.021) and gain["pcam"]["n_backbones"] == 6
    assert "| Mean gain over backbones |  |  | +2.10 (6 backbones) |" in md


def test_ablation_table(paper_runs):
    _, result = paper_runs
    rows = {
        (r["variant"], r["kind"]): r for r in result["ablations"] if r["backbone"] == "uni" and r["dataset"] == "pcam"
    }
    assert rows[("no-lora", "clipit")]["mean"] == pytest.approx(0.9396)
    assert rows[("no-lora", "clipit")]["delta_clipit"] == pytest.approx(0.9396 - 0.904)
    assert ("", "unimodal") in rows and ("", "clipit") in rows and ("", "text") not in rows
    assert {r["dataset"] for r in result["ablations"]} == {"pcam"}  # text-only runs alone are no ablation


def test_omega_matches_by_key():
    keys = np.array(["a", "b", "c", "d"])
    labels = np.array([0, 1, 0, 1])
    text = {"keys": keys, "labels": labels, "pred": np.array([0, 1, 1, 1])}  # right on a, b, d
    vision = {"keys": keys[::-1], "labels": labels[::-1], "pred": np.array([0, 0, 1, 1])[::-1]}  # wrong on b, c
    assert omega(text, vision) == (0.25, 4)  # only b: text right, vision wrong
    with pytest.raises(ValueError, match="share no sample keys"):
        omega(text, {"keys": np.array(["x"]), "labels": np.array([0]), "pred": np.array([0])})


def test_omega_table_from_predictions(paper_runs):
    root, result = paper_runs
    rows = {(r["backbone"], r["dataset"]): r for r in result["omega"]}
    assert len(rows) == 18 and all(r["n_seeds"] == 3 and r["matched"] == N_TEST for r in rows.values())
    from clipit.results.multimodal_tables import load_predictions

    runs, _ = find_runs(root)
    pick = {(r.backbone, r.dataset, r.kind, r.seed): r for r in runs if r.variant == ""}
    values = []
    for seed in range(3):
        t = load_predictions(pick[("uni", "crc", "text", seed)])
        v = load_predictions(pick[("kaiko-vitb8", "crc", "unimodal", seed)])
        ti, vi = np.argsort(t["keys"]), np.argsort(v["keys"])
        values.append(np.mean((t["pred"][ti] == t["labels"][ti]) & (v["pred"][vi] != v["labels"][vi])))
    assert rows[("kaiko-vitb8", "crc")]["omega_mean"] == pytest.approx(np.mean(values))
    assert rows[("kaiko-vitb8", "crc")]["omega_std"] == pytest.approx(np.std(values, ddof=1))
    assert 0 < np.mean(values) < 0.2


def test_files_and_status(paper_runs):
    root, result = paper_runs
    out = root / "report"
    for name in (
        "report.md",
        "table1.csv",
        "ablations.csv",
        "omega.csv",
        "runs.csv",
        "pareto.png",
        "omega.png",
        "curves-pcam.png",
    ):
        assert (out / name).stat().st_size > 100, name
    md = (out / "report.md").read_text()
    assert "1 failed" in md and "CUDA out of memory" in md and "![pareto](pareto.png)" in md


def test_cli_report(paper_runs, tmp_path):
    root, _ = paper_runs
    proc = subprocess.run(
        [sys.executable, "-m", "clipit", "report", str(root), "--out", str(tmp_path / "r"), "--no-plots"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## Table 1" in proc.stdout and (tmp_path / "r" / "table1.csv").exists()
    assert not (tmp_path / "r" / "pareto.png").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "clipit", "report", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "no such directory" in proc.stderr


def test_every_figure_as_png_pdf_and_svg(paper_runs):
    root, result = paper_runs
    out = root / "report"
    magic = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-"}
    for stem in ("pareto", "omega", "curves-pcam", "curves-pcam-uni-ablations"):
        for suffix in (".png", ".pdf", ".svg"):
            path = out / f"{stem}{suffix}"
            assert str(path) in result["files"] and path.stat().st_size > 1000, path
            head = path.read_bytes()[:200]
            assert head.startswith(magic[suffix]) if suffix in magic else b"<svg" in head, path
        assert f"![{stem}]({stem}.png)" in result["markdown"]  # report.md shows the PNG
    assert "</svg>" in (out / "pareto.svg").read_text()[-100:]  # written whole


def test_curves_continue_after_the_warm_start(paper_runs):
    from clipit.results.curves import _scalars, warm_start_offsets

    root, _ = paper_runs
    runs, _ = find_runs(root)
    scalars = _scalars(runs)
    offsets = warm_start_offsets(runs, scalars)
    drawn = [r for r in runs if r.path in scalars]
    clipit = [r for r in drawn if r.kind == "clipit"]
    assert clipit and all(offsets[r.path] == 100 for r in clipit)  # the probe's last logged step
    assert {r.variant for r in clipit} == {"", "no-lora", "no-text"}  # ablations reuse the main probe
    assert not any(r.path in offsets for r in drawn if r.kind == "unimodal")


def test_latex_tables_beside_markdown_and_csv(paper_runs):
    root, _ = paper_runs
    tex = (root / "report" / "table1.tex").read_text()
    lines = tex.splitlines()
    assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
    assert tex.count(r"\midrule") == 2  # under the header, and above the mean-gain row
    rows = [line for line in lines if line.endswith(r"\\")]
    assert len(rows) == 1 + 6 + 1 and all(row.count(" & ") == 9 for row in rows)
    assert r"UNI & 88.30 $\pm$ 0.30 & 90.40 $\pm$ 0.40 & +2.10" in tex
    assert r"\caption{Test balanced accuracy (\%)" in tex and r"\label{tab:table1}" in tex
    assert tex.count(r"\begin{") == tex.count(r"\end{") == 2
    for name in ("gains.tex", "comparison.tex", "ablations.tex"):
        assert r"\bottomrule" in (root / "report" / name).read_text()


def test_table1_shows_the_eva_protocol_probe_beside_ours(tmp_path):
    """Runs of eva_probe (kaiko eva's recipe, configs/grids/paper_eva_probe.yaml) get a Table 1 column of
    their own next to the reference code's probe; Δ stays CLIP-IT vs our probe."""
    from clipit.results.tables import table1

    for seed in range(2):
        make_run(tmp_path, "uni", "pcam", "unimodal", "unimodal", seed, 0.80)
        make_run(tmp_path, "uni", "pcam", "eva_probe", "eva_probe", seed, 0.85)
        make_run(tmp_path, "uni", "pcam", "clipit", "clipit", seed, 0.90)
    runs, _ = find_runs(tmp_path)
    header, rows, records = table1(runs, "balanced_accuracy")
    assert header[:5] == ["Vision backbone", "PCAM Unimodal (eva protocol)", "PCAM Unimodal", "PCAM CLIP-IT", "PCAM Δ"]
    assert rows[0][1:5] == ["85.00 ± 0.00", "80.00 ± 0.00", "90.00 ± 0.00", "+10.00"]
    assert records[0]["eva_probe_mean"] == pytest.approx(0.85) and records[0]["delta"] == pytest.approx(0.10)

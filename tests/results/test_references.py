"""Published numbers as package data (clipit/results/references.py) and `clipit report`'s comparison with
them: a synthetic run labelled as a paper cell shows the reference, the difference and the flag."""

import csv

import pytest

from clipit.results.references import COLUMNS, ReferenceFileError, load_references, shipped_references
from clipit.results.report import build_report
from clipit.results.runs import BACKBONE_NAMES, DATASET_NAMES
from clipit_testing import cli, finished_run


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_shipped_references_name_their_source_and_version():
    refs = shipped_references()
    assert all(r.source and r.version and 0 < r.value < 1 for r in refs)
    cells = {(r.source, *r.cell): r for r in refs}
    assert cells[("paper-v2", "pcam", "uni", "unimodal", "")].value == pytest.approx(0.9424)
    assert cells[("paper-v2", "bach", "kaiko-vitb8", "clipit", "")].value == pytest.approx(0.8491)
    assert cells[("paper-v2", "pcam", "uni", "clipit", "no-lora")].value == pytest.approx(0.9386)
    assert cells[("code-readme", "crc", "kaiko-vits8", "clipit", "")].std == pytest.approx(0.0030)
    # eva: a linear probe of every backbone of ours on every dataset, under our names
    eva = {(r.dataset, r.backbone) for r in refs if r.source == "eva"}
    assert eva == {(d, b) for d in DATASET_NAMES for b in BACKBONE_NAMES}
    assert all(r.method == "unimodal" and "@" in r.version for r in refs if r.source == "eva")
    uni_pcam = cells[("eva", "pcam", "uni", "unimodal", "")]
    assert uni_pcam.value == pytest.approx(0.937) and "mahmood_uni" in uni_pcam.note


def test_a_run_labelled_as_a_paper_cell_shows_reference_difference_and_flag(tmp_path):
    for seed, acc in enumerate((0.9414, 0.9434)):  # mean 94.24 = the paper's UNI / PCAM probe
        finished_run(tmp_path, "uni", "pcam", "unimodal", "unimodal", seed, acc)
        finished_run(tmp_path, "uni", "pcam", "clipit", "clipit", seed, 0.92)  # 3.49 points under the paper
    finished_run(tmp_path, "uni", "pcam", "clipit", "clipit", 0, 0.9436, axes={"ablation": "no-lora"})
    result = build_report(tmp_path, tmp_path / "report", plots=False)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| PCAM | UNI | Unimodal | 94.24 ± 0.14 | 94.24 | +0.00 | 94.20 | +0.04 | 93.70 | +0.54 | – |" in md
    assert (
        "| PCAM | UNI | CLIP-IT | 92.00 ± 0.00 | 95.49 | -3.49 | 95.50 | -3.50 | – | – | paper-v2, code-readme |" in md
    )
    assert "| PCAM | UNI | CLIP-IT, no lora | 94.36 (1 seed) | 93.86 | +0.50 | – | – | – | – | – |" in md
    assert "kaiko-ai/eva tools/data/leaderboards/pathology.csv @555c3c7" in md  # each source's version
    rows = {(r["method"], r["variant"]): r for r in read_csv(tmp_path / "report" / "comparison.csv")}
    clipit = rows[("clipit", "")]
    assert float(clipit["delta_paper-v2_pct"]) == pytest.approx(-3.49)
    assert clipit["outside_tolerance"] == "paper-v2 code-readme" and clipit["eva_mean_pct"] == ""
    assert rows[("clipit", "no-lora")]["std_pct"] == ""  # one seed: no spread, not 0
    assert len(result["comparison"]) == 3  # only the cells we have runs for
    # a wider tolerance (percentage points) flags nothing
    build_report(tmp_path, tmp_path / "wide", plots=False, tolerance=4)
    assert {r["outside_tolerance"] for r in read_csv(tmp_path / "wide" / "comparison.csv")} == {""}


def test_more_references_from_a_file_and_a_broken_one_named(tmp_path):
    finished_run(tmp_path / "runs", "uni", "crc", "unimodal", "unimodal", 0, 0.95)
    mine = tmp_path / "mine.csv"
    header = ",".join(COLUMNS)
    mine.write_text(f"{header}\nthesis,Table 3 (draft 2),crc,uni,unimodal,,95.5,,3,our earlier numbers\n")
    result = build_report(tmp_path / "runs", tmp_path / "out", plots=False, references=[mine])
    (row,) = result["comparison"]
    assert row["thesis_mean"] == pytest.approx(0.955) and row["delta_thesis"] == pytest.approx(-0.005)
    mine.write_text(f"{header}\nthesis,Table 3,crc,uni,unimodal,,high,,3,\n")
    r = cli("report", str(tmp_path / "runs"), "--no-plots", "--references", str(mine))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{mine} line 2: value_pct is 'high', not a number" in r.stderr
    mine.write_text(f"{header}\neva,again,crc,uni,unimodal,,95.5,,,\n")  # the shipped eva cell given twice
    with pytest.raises(ReferenceFileError, match="given by two files"):
        load_references([mine])
    r = cli("report", str(tmp_path / "runs"), "--no-plots", "--tolerance", "-1")
    assert r.returncode == 2 and "--tolerance -1.0: give a non-negative number" in r.stderr

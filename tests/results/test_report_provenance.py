"""The report's provenance footnotes (clipit/results/provenance_notes.py): shared facts stated once, runs
whose commit, packages, device, precision or weights differ within a table named, in report.md and LaTeX."""

import copy
import json

import yaml

from clipit.provenance import write_provenance
from clipit.results.provenance_notes import provenance_notes
from clipit.results.report import build_report


def make_run(root, method: str, seed: int, acc: float):
    """A finished UNI / PCAM run: config.yaml and metrics.json, as a grid lays it out."""
    run = root / "pcam" / "uni" / "runs" / method / f"seed-{seed}"
    run.mkdir(parents=True)
    method_cfg = {"method": method} | ({"warm_start": "unimodal"} if method == "clipit" else {})
    cfg = {"model": {"backbone": "uni"}, "data": {"name": "pcam"}, "methods": {method: method_cfg}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"method": method, "balanced_accuracy": acc, "accuracy": acc, "parameters": {"total": 1000}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


RECORD = {
    "format": "clipit-provenance",
    "version": 1,
    "clipit": {"version": "0.9.0", "git": {"commit": "a" * 40, "dirty": False}},
    "config_sha256": "c" * 64,
    "weights": {
        "backbone": {"location": "weights/uni.bin", "sha256": "1" * 64},
        "warm_start": {"location": "runs/x/best.safetensors", "sha256": "9" * 64},
    },
    "data": {"training_shards_sha256": "d" * 64},
    "precision": "bf16",
    "device": {"type": "cuda", "name": "NVIDIA H100", "processes": 1},
    "python": "3.11.7",
    "packages": {"torch": "2.4.0", "timm": "1.0.9"},
}


def test_shared_facts_once_and_differing_runs_named():
    other = {"clipit": "0.9.0 (bbb)", "torch": "2.4.0"}
    notes = provenance_notes(
        {
            "r1": {"clipit": "0.9.0 (aaa)", "torch": "2.4.0"},
            "r2": {"clipit": "0.9.0 (aaa)", "torch": "2.4.0"},
            "r3": other,
        },
        missing=["r4"],
    )
    assert notes == [
        "Provenance (3 runs): torch 2.4.0.",
        "clipit differs: 0.9.0 (bbb) in r3; 0.9.0 (aaa) in the other 2 run(s).",
        "No provenance.json (runs from before it was recorded): r4.",
    ]
    assert provenance_notes({}) == []


def test_report_footnotes_name_the_runs_that_differ(tmp_path):
    runs = {}
    for method in ("unimodal", "clipit"):
        for seed in (0, 1):
            runs[method, seed] = make_run(tmp_path, method, seed, 0.9 + 0.01 * seed)
    for (method, seed), run in runs.items():
        record = copy.deepcopy(RECORD)
        record["weights"]["warm_start"]["sha256"] = str(seed) * 64  # differs by design: never named
        if (method, seed) == ("clipit", 1):  # another commit, another GPU, other backbone bytes
            record["clipit"]["git"] = {"commit": "b" * 40, "dirty": True}
            record["device"]["name"] = "NVIDIA A100"
            record["weights"]["backbone"]["sha256"] = "2" * 64
        if (method, seed) != ("unimodal", 1):  # one run from before provenance was recorded
            write_provenance(run, record)
    result = build_report(tmp_path, plots=False, warn=lambda message: None)
    md = (tmp_path / "report" / "report.md").read_text()
    name = "uni/pcam clipit seed 1"
    for line in (
        "Provenance (3 runs): python 3.11.7, timm 1.0.9, torch 2.4.0, precision bf16.",
        f"clipit differs: 0.9.0 (bbbbbbbbbbbb+dirty) in {name}; 0.9.0 (aaaaaaaaaaaa) in the other 2 run(s).",
        f"device differs: 1 x cuda NVIDIA A100 in {name}; 1 x cuda NVIDIA H100 in the other 2 run(s).",
        f"backbone weights weights/uni.bin differs: sha256 222222222222 in {name}; sha256 111111111111 in the "
        "other 2 run(s).",
        "No provenance.json (runs from before it was recorded): uni/pcam unimodal seed 1.",
    ):
        assert line in md and line in result["provenance"], line
    assert "warm_start" not in md and "## Provenance" in md
    tex = (tmp_path / "report" / "table1.tex").read_text()
    assert r"\footnotesize clipit differs: 0.9.0 (bbbbbbbbbbbb+dirty) in uni/pcam clipit seed 1" in tex
    assert r"\footnotesize No provenance.json" in tex

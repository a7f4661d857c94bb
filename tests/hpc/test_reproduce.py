"""`clipit reproduce` (clipit/hpc/reproduce.py): the chain doctor -> pairing and shards -> grids -> report,
its dry run on the paper grid, a rerun that skips what is built, and the whole chain on the demo data with
submitit's local executor (slow); `clipit prepare reports` (clipit/corpus_join.py)."""

import csv
import json
import re
import subprocess
import sys

import pytest

from clipit_testing import ROOT, cli

TABLE1 = str(ROOT / "configs/grids/paper_table1.yaml")


def test_paper_dry_run_prints_every_stage_then_the_missing_assets(tmp_path):
    dry = cli("reproduce", "--grid", TABLE1, "--root", str(tmp_path / "paper"), "--dry-run")
    out = dry.stdout
    stages = [
        "reproduce: 1 grid(s), 216 cells; executor slurm (profile gpu-cluster)",
        "stage 2 prepare: 3 pairing task(s), 3 shard dir(s) x 16 part(s) + 3 finalize job(s); 0 shard dir(s) built",
        "stage 3 grids: after stage 2 succeeds (afterok), one CPU job submits",
        f"--stage grids --profile gpu-cluster --root {tmp_path / 'paper'}",
        "stage 4 frozen features: 108 Table 1 cell(s), unfinished ones skipped; a job per cell after every grid job",
        "--method unimodal --seed 0 --frozen",
        "... and 104 more: one per probe and CLIP-IT cell",
        "  cost: 9,660,432 images through the backbones, ",
        "stage 5 report: one job after every stage 4 job ends (afterany",
        f"clipit report {tmp_path / 'paper'}",
        "grid paper_table1: 216 cells in 54 tasks",  # stage 3's plan, as `clipit grid --dry-run`
        "would submit 54 tasks (216 cells)",
        "stage 1 doctor: 18 distinct config(s), shards left to stage 2",
    ]
    positions = [out.find(line) for line in stages]
    assert -1 not in positions, [s for s, p in zip(stages, positions) if p < 0]
    assert positions.index(max(positions)) == len(stages) - 1  # the checks come last, after the plan
    assert out.count("clipit pair --config") == 3 and out.count("--part $I --num-parts 16") == 3
    # no assets here: the doctor stage names each missing one and refuses, as `clipit grid` does
    assert dry.returncode == 2, dry.stderr
    assert "✗ data: data/pcam not found" in out and "✗ weights file: configs/weights.yaml" in out
    assert "clipit: error: pre-flight: " in dry.stderr and "before the chain starts (or --no-preflight)" in dry.stderr
    assert "✗ shards" not in out  # stage 2 builds them: not a ✗ before it
    assert not (tmp_path / "paper").exists()  # a dry run writes nothing


def test_a_rerun_skips_the_built_shards_and_checks_them(tiny_shards, tmp_path):
    sets = "".join(f"  {s.split('=', 1)[0]}: {s.split('=', 1)[1]}\n" for s in tiny_shards)
    grid = tmp_path / "tiny.yaml"
    grid.write_text(
        f"name: tiny\nbase: {ROOT / 'configs/demo-tiny.yaml'}\nroot: {tmp_path / 'runs'}\nprofile: local-cluster\n"
        "seeds: [0]\nmethods: [unimodal, clipit]\nset:\n  output_dir: '{root}/{r}'\n" + sets + "axes: {r: {a: {}}}\n"
    )
    dry = cli("reproduce", "--grid", str(grid), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "stage 2 prepare: 0 pairing task(s), 0 shard dir(s) x 16 part(s) + 0 finalize job(s); 1 shard dir(s)" in (
        dry.stdout
    )
    assert "stage 1 doctor: 1 distinct config(s)\n" in dry.stdout and "✓ shards" in dry.stdout  # built: checked
    assert "stage 3 grids: after stage 2 succeeds (afterok), one CPU job submits" in dry.stdout  # local-cluster
    assert not (tmp_path / "runs").exists()
    # --no-frozen: no stage 4 here, nor in the stage 3 job that runs the rest of the chain on the cluster
    skip = cli("reproduce", "--grid", str(grid), "--dry-run", "--no-frozen")
    assert skip.returncode == 0 and "stage 4 frozen features: skipped (--no-frozen)" in skip.stdout
    assert "--stage grids --profile local-cluster --no-frozen)" in skip.stdout
    assert "--frozen" not in skip.stdout.replace("--no-frozen", "")


def test_prepare_reports_joins_the_cancer_types(tmp_path):
    reports, types, out = tmp_path / "TCGA_Reports.csv", tmp_path / "types.csv", tmp_path / "tcga" / "reports.csv"
    with reports.open("w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["patient_filename", "text"],
                ["TCGA-AA-0001.5C3A", "invasive ductal carcinoma, grade 2"],
                ["TCGA-BB-0002.77F1", "adenocarcinoma of the colon,\nmoderately differentiated"],
                ["TCGA-CC-0003.0000", "no type for this patient"],
                ["TCGA-DD-0004.1111", "   "],
            ]
        )
    types.write_text("patient_id,cancer_type\nTCGA-AA-0001,BRCA\nTCGA-BB-0002,COAD\n")
    done = cli("prepare", "reports", "--csv", str(reports), "--project-map", str(types), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: 3 reports (BRCA 1, COAD 1; 1 without a project)" in done.stdout
    rows = list(csv.DictReader(out.open(newline="")))
    assert [(r["id"], r["project"]) for r in rows] == [
        ("TCGA-AA-0001.5C3A", "BRCA"),
        ("TCGA-BB-0002.77F1", "COAD"),
        ("TCGA-CC-0003.0000", ""),
    ]
    assert rows[1]["text"] == "adenocarcinoma of the colon,\nmoderately differentiated"  # the text as written
    again = cli("prepare", "reports", "--csv", str(reports), "--project-map", str(types), "--out", str(out))
    assert again.returncode == 2 and "exists already; give another --out, or --overwrite" in again.stderr
    missing = cli("prepare", "reports", "--csv", str(tmp_path / "no.csv"), "--project-map", str(types), "--out", "x")
    assert missing.returncode == 2 and "no.csv: report corpus not found" in missing.stderr


@pytest.mark.slow
def test_demo_chain_runs_end_to_end_locally_and_a_rerun_resumes(tmp_path):
    runs = tmp_path / "runs"
    command = [
        sys.executable,
        "launchers/reproduce.py",
        "--grid",
        "configs/grids/demo_methods.yaml",
        "--local",
        "--root",
        str(runs),
        "--num-parts",
        "1",
        "--set",
        "data.demo.counts={train: 64, val: 32, test: 32}",
        "--set",
        "data.demo.clip_steps=5",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for line in ("stage 1 doctor:", "stage 2 prepare: 1 pairing dir(s), 1 shard dir(s)", "local run finished: "):
        assert line in out, line
    assert "stage 4 frozen features: 4 cell(s) of demo_methods" in out  # probe and CLIP-IT x 2 seeds
    reported = re.search(r"stage 5 report: (\d+) run\(s\); wrote .*report\.md", out)
    assert reported, out[-3000:]
    assert (runs / "demo" / "shards" / "manifest.json").is_file()
    md = (runs / "report" / "report.md").read_text()
    assert "## Table 1" in md and "## Provenance" in md and "Provenance (4 runs)" in md
    frozen = md.split("## Frozen features: k-NN and few-shot")[1].split("\n## ")[0]
    assert "| demo | demo-vit-tiny | Unimodal | 2 |" in frozen and "| demo | demo-vit-tiny | CLIP-IT | 2 |" in frozen
    assert "16-shot" in frozen and (runs / "report" / "frozen.tex").is_file()
    records = sorted((runs / "demo" / "demo-vit-tiny" / "runs").glob("*/seed-*/frozen_eval.json"))
    assert [(p.parent.parent.name, p.parent.name) for p in records] == [
        ("clipit", "seed-0"),
        ("clipit", "seed-1"),
        ("unimodal", "seed-0"),
        ("unimodal", "seed-1"),
    ]
    written = {p: p.stat().st_mtime_ns for p in records}
    state = json.loads((runs / "demo" / "demo-vit-tiny" / "runs" / "clipit" / "seed-0" / "state.json").read_text())
    assert state["state"] == "done" and state["executor"] == "local"
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "stage 2 prepare: all 1 shard dir(s) built; skipped" in again.stdout
    # every cell of the grid is reported (none left out), and none runs again
    assert f"nothing to submit: cells {reported.group(1)} done" in again.stdout and "stage 5 report: " in again.stdout
    # every record scores its cell's training
    assert "stage 4 frozen features: all 4 cell(s) scored for their current training; skipped" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in records} == written

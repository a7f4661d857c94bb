"""The frozen-feature stage of `clipit reproduce` (clipit/hpc/frozen_stage.py): which cells it evaluates
(Table 1's probe and CLIP-IT main runs, nothing else), what a rerun skips (a frozen_eval.json that scores
the cell's current training), a cell that did not finish named and skipped, and one GPU per job. The stage
run end to end is tests/hpc/test_reproduce.py (local) and tests/hpc/test_reproduce_slurm.py."""

import json
from pathlib import Path

from clipit.evaluation.frozen_record import TRAINED
from clipit.hpc.frozen_stage import FrozenCall, FrozenJob, frozen_cells, frozen_profile, pending
from clipit.hpc.grid import expand
from clipit.io import sha256_file
from clipit_testing import ROOT

DEMO = ROOT / "configs/grids/demo_methods.yaml"


def scored(run_dir, stamp_of=None):
    """A trained and evaluated run folder with a frozen_eval.json for its training (or for `stamp_of`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_summary.json").write_text(json.dumps({"steps": 4, "wall_s": 1.0}))
    (run_dir / "metrics.json").write_text(json.dumps({"balanced_accuracy": 0.5}))
    stamp = sha256_file(stamp_of or run_dir / "train_summary.json")
    (run_dir / "frozen_eval.json").write_text(json.dumps({TRAINED: stamp, "knn": {"balanced_accuracy": 0.5}}))


def test_the_stage_takes_the_main_probe_and_clipit_cells(tmp_path):
    plan = expand(DEMO, root=str(tmp_path))
    cells = frozen_cells([plan])
    # the grid trains 8 methods x 2 seeds in its main runs plus a frozen-teacher CLIP-IT: only the pair counts
    assert sorted((c.method, c.seed) for c in cells) == [("clipit", 0), ("clipit", 1), ("unimodal", 0), ("unimodal", 1)]
    assert all(dict(c.axes)["ablation"] == "full" for c in cells)
    assert frozen_cells([plan, plan]) == cells  # two grids naming one run folder: evaluated once


def test_a_rerun_skips_what_scores_the_current_training(tmp_path):
    cells = frozen_cells([expand(DEMO, root=str(tmp_path))])
    assert pending(cells) == cells
    done, foreign = Path(cells[0].run_dir), Path(cells[1].run_dir)
    scored(done)
    scored(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "train_summary.json").write_text(json.dumps({"steps": 9, "wall_s": 7.0}))
    scored(foreign, stamp_of=tmp_path / "elsewhere" / "train_summary.json")  # scored another training
    assert pending(cells) == cells[1:]
    # the cell trained again (its train_summary.json rewritten): its record is stale and evaluated again
    (done / "train_summary.json").write_text(json.dumps({"steps": 4, "wall_s": 3.0}))
    assert pending(cells) == cells
    (done / "frozen_eval.json").write_text("{not json")  # unreadable: evaluated again, not trusted
    assert pending(cells) == cells


def test_a_cell_made_under_another_config_is_queued_again(tmp_path, capsys):
    """Under SLURM stage 4 is queued before the grid's cells run: a cell the grid trains again (its run was
    made under another config) gets a job although its record scores the run that is there now."""
    cells = frozen_cells([expand(DEMO, root=str(tmp_path))])
    run = Path(cells[0].run_dir)
    summary = {"identity": {"model.backbone": "another-backbone"}, "wall_s": 1.0}
    scored(run)
    (run / "train_summary.json").write_text(json.dumps(summary))
    record = json.loads((run / "frozen_eval.json").read_text())
    (run / "frozen_eval.json").write_text(json.dumps(record | {TRAINED: sha256_file(run / "train_summary.json")}))
    assert pending(cells) == cells
    # the job itself runs nothing while the record still scores the training in the folder
    assert FrozenCall(str(ROOT))(FrozenJob(cells[0])) == "skipped (scored already)"
    assert "frozen_eval.json scores its current training already" in capsys.readouterr().out


def test_an_unfinished_cell_is_named_and_skipped(tmp_path, capsys):
    (cell, *_) = frozen_cells([expand(DEMO, root=str(tmp_path))])
    assert FrozenCall(str(ROOT))(FrozenJob(cell)) == "skipped (cell not finished)"
    assert f"{cell.key}: not finished (failed or not run); no frozen evaluation" in capsys.readouterr().out
    argv = FrozenJob(cell).argv()
    assert argv[0] == "evaluate" and argv[-5:] == ["--method", "unimodal", "--seed", "0", "--frozen"]


def test_each_job_is_one_process_on_at_most_one_gpu(tmp_path):
    plan = expand(ROOT / "configs/grids/paper_table1.yaml", root=str(tmp_path))
    profile = frozen_profile(plan, plan.grid.profile)
    assert (profile.nodes, profile.tasks_per_node, profile.gpus_per_node) == (1, 1, 1)
    assert len(frozen_cells([plan])) == 6 * 3 * 2 * 3  # backbones x datasets x (probe, CLIP-IT) x seeds


def test_the_dry_run_prices_the_stage(tmp_path):
    """Each cell's test split; the train split once per feature cache: the probe's frozen backbone has one
    for its seeds, each CLIP-IT run's tuned backbone its own."""
    from clipit.hpc.cost import frozen_eval_stage, split_counts

    cells = frozen_cells([expand(DEMO, root=str(tmp_path))])
    counts = split_counts(cells[0].load())
    stage = frozen_eval_stage(cells)
    assert stage.images(False) == 4 * counts["test"] + 3 * counts["train"] and stage.texts(False) == 0
    assert stage.images(True) == stage.images(False)  # the cache is how stage 4 works, on or off


def test_nothing_runs_when_every_cell_is_scored(tmp_path, capsys):
    from clipit.hpc.frozen_stage import submit_frozen

    plan = expand(DEMO, root=str(tmp_path))
    for cell in frozen_cells([plan]):
        scored(Path(cell.run_dir))
    # the same grid twice: its run folders count once
    assert submit_frozen([plan, plan], plan.grid.profile, "local", tmp_path / "logs") == ([], 0)
    out = capsys.readouterr().out
    assert "stage 4 frozen features: all 4 cell(s) scored for their current training; skipped" in out
    assert not (tmp_path / "logs").exists()

"""Session fixtures: what is built or trained once per session and shared. Tests never write into them:
a test that modifies one works on its own copy (shutil.copytree into its tmp_path)."""

import pytest

from clipit_testing import RESUME_CELL, TINY, cli, run_clipit, train_args


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """`clipit demo` on the tiny config, in a real process as a user runs it (data, the demo CLIP, pairs,
    shards, unimodal and CLIP-IT for seeds 0 and 1, results): the demo CLIP is trained once per session,
    here. Returns (output dir, stdout)."""
    out = tmp_path_factory.mktemp("tiny")
    proc = run_clipit("demo", "--config", TINY, "--set", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="session")
def tiny_shards(tiny_demo):
    """Overrides that point a run at the tiny demo's shards, pairs, data and demo CLIP (built once)."""
    base, _ = tiny_demo
    return [
        f"shards.dir={base / 'shards'}",
        f"pairing.dir={base / 'pairing'}",
        f"data.root={base / 'data' / 'images'}",
        f"reports.path={base / 'data' / 'reports.jsonl'}",
        f"pairing.checkpoint={base / 'demo-clip' / 'model.safetensors'}",
    ]


@pytest.fixture(scope="session")
def resume_cell(tiny_shards, tmp_path_factory):
    """The 12-step stand-alone CLIP-IT cell (RESUME_CELL), trained and evaluated once per session without
    interruption: the reference of the resume tests. Returns its output dir."""
    out = tmp_path_factory.mktemp("resume-cell")
    proc = cli(*train_args(out, tiny_shards, *RESUME_CELL))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out

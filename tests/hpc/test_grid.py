"""Grid files -> cells -> tasks (clipit/hpc/grid_file.py, grid.py, grid_tasks.py): the shipped grids, templating, warm-start reuse, errors."""

import os
import shutil

import pytest
import yaml

from clipit.config import ConfigError, load_config
from clipit.hpc.cluster import PROFILE_DIR, ClusterProfile, load_profile
from clipit.hpc.executor import array_chunk_size, make_executor
from clipit.hpc.grid import expand, format_override
from clipit.hpc.grid_file import load_grid
from clipit.hpc.grid_tasks import chunk
from clipit.typed_yaml import apply_override
from clipit_testing import ROOT, cli

GRIDS = sorted((ROOT / "configs" / "grids").glob("*.yaml"))
PROFILES = sorted(PROFILE_DIR.glob("*.yaml"))
PAPER_BACKBONES = {"uni", "kaiko-vits16", "kaiko-vits8", "kaiko-vitb16", "kaiko-vitb8", "kaiko-vitl14"}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # grid paths are relative to the launch directory


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_every_shipped_grid_expands_and_every_cell_config_loads(path):
    plan = expand(path)
    assert plan.cells and plan.tasks
    assert len({c.run_dir for c in plan.cells}) == len(plan.cells)
    for cell in plan.cells:
        cfg = cell.load()  # the exact `clipit train --config CFG --set ...` of the cell
        assert cell.method in cfg.methods and cfg.methods[cell.method].method == cell.kind
        assert cell.seed in cfg.seeds
    for task in plan.tasks:  # within a task, a warm start always comes before the cell that needs it
        seen = set()
        for cell in task.cells:
            if cell.warm_start and not cell.warm_start_link:
                assert cell.warm_start in seen, (task.label, cell.method)
            seen.add(cell.method)
    load_profile(plan.grid.profile, plan.grid.resources)


def test_shipped_grids_exist():
    assert {p.stem for p in GRIDS} >= {"paper_table1", "paper_ablations", "paper_lora", "paper_eva_probe", "demo"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_loads(path):
    assert isinstance(load_profile(str(path)), ClusterProfile)


def test_paper_table1_is_216_cells_in_54_chains():
    plan = expand(ROOT / "configs/grids/paper_table1.yaml")
    assert len(plan.cells) == 216 and len(plan.tasks) == 54
    combos = {(c.labels["backbone"], c.labels["dataset"], c.method, c.seed) for c in plan.cells}
    assert len(combos) == 216
    assert {c.labels["backbone"] for c in plan.cells} == PAPER_BACKBONES
    assert {c.labels["dataset"] for c in plan.cells} == {"pcam", "bach", "crc"}
    assert {c.seed for c in plan.cells} == {0, 1, 2}
    for task in plan.tasks:
        assert [c.method for c in task.cells] == ["unimodal", "clipit", "text", "late_fusion"] and not task.after
        assert len({c.seed for c in task.cells}) == 1
    for cell in plan.cells:
        cfg = cell.load()
        assert cfg.model.backbone == cell.labels["backbone"] and cfg.data.name == cell.labels["dataset"]
        assert cfg.shards.dir.endswith(f"/{cell.labels['dataset']}/shards")  # shared by all backbones
        assert cfg.reports.projects == (["COAD"] if cell.labels["dataset"] == "crc" else ["BRCA"])
        assert cfg.pairing.precision == "fp32"  # as the reference code
        # the paper's method: the pairing model's text tower + LoRA, in the same step
        assert cfg.methods["clipit"].text_encoder == "tower" and cfg.model.lora.enabled
        assert cfg.methods["late_fusion"].text_warm_start == "text"


def test_paper_ablations_reuse_table1_uni_pcam_runs():
    table1 = {
        c.run_dir
        for c in expand(ROOT / "configs/grids/paper_table1.yaml").cells
        if c.labels["backbone"] == "uni" and c.labels["dataset"] == "pcam" and c.method in ("unimodal", "clipit")
    }
    plan = expand(ROOT / "configs/grids/paper_ablations.yaml")
    full = [c for c in plan.cells if c.labels["ablation"] == "full"]
    assert {c.run_dir for c in full} == table1  # nothing retrained when Table 1 ran
    variants = [c for c in plan.cells if c.labels["ablation"] != "full"]
    assert variants and all(c.method == "clipit" for c in variants)
    unimodal = {c.seed: c.run_dir for c in full if c.method == "unimodal"}
    for cell in variants:
        assert cell.warm_start_link == unimodal[cell.seed]
    by_label = {t.label: i for i, t in enumerate(plan.tasks)}
    for task in plan.tasks:
        if task.cells[0].labels["ablation"] != "full":
            assert [plan.tasks[i].label for i in task.after] == [f"ablation=full,seed={task.cells[0].seed}"]
    assert len(by_label) == len(plan.tasks)
    # Once the probes exist, the variants no longer wait for anything.
    done = expand(ROOT / "configs/grids/paper_ablations.yaml", check_done=lambda c: True)
    assert not any(t.after for t in done.tasks)
    overrides = {c.labels["ablation"]: load_config(c.config, list(c.overrides)) for c in variants if c.seed == 0}
    assert overrides["frozen-teacher"].methods["clipit"].text_encoder == "cached"
    assert overrides["word-drop-30"].methods["clipit"].text_encoder == "tower"  # varies the tower-based full run
    assert overrides["no-lora"].model.lora.enabled is False
    assert overrides["no-text"].methods["clipit"].lam == 0.0
    assert overrides["report-rank-3"].shards.use_rank == 3 and overrides["report-rank-3"].pairing.top_k >= 3
    assert overrides["early-fusion"].methods["clipit"].method == "early_fusion"
    assert overrides["full-finetune"].methods["clipit"].finetune == "full"
    assert overrides["full-finetune"].methods["clipit"].pretrained_lr == 1e-5  # P, H_t, F keep lr 1e-3
    assert overrides["full-finetune"].methods["clipit"].lr == 1e-3
    remove = next(c for c in variants if c.labels["ablation"] == "word-drop-30-remove")
    assert dict(remove.compare_to) == {"ablation": "word-drop-30"} and dict(remove.axis_labels)


def test_paper_lora_search_shares_table1_runs_and_varies_lora():
    table1 = {c.run_dir for c in expand(ROOT / "configs/grids/paper_table1.yaml").cells if c.method == "clipit"}
    plan = expand(ROOT / "configs/grids/paper_lora.yaml")
    full = {c.run_dir for c in plan.cells if c.labels["lora"] == "full" and c.method == "clipit"}
    assert full and full <= table1
    settings = {
        (cfg.model.lora.r, cfg.model.lora.alpha, tuple(cfg.model.lora.targets))
        for cfg in (
            c.load()
            for c in plan.cells
            if c.seed == 0 and c.labels["dataset"] == "pcam" and c.labels["backbone"] == "uni"
        )
    }
    assert len(settings) == 8 and (16, 8, ("Linear", "Conv2d", "Embedding")) in settings


def test_dry_run_lists_the_216_cells_of_table1():
    proc = cli("grid", "--config", "configs/grids/paper_table1.yaml", "--dry-run", "--no-preflight")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cell_lines = [line for line in proc.stdout.splitlines() if line.startswith("  ") and "/runs/" in line]
    assert len(cell_lines) == 216
    assert "would submit 54 tasks (216 cells)" in proc.stdout
    assert sum("clipit, lora, text tower" in line for line in cell_lines) == 54
    methods = [line.split()[0] for line in cell_lines]
    assert methods.count("late_fusion") == 54 and methods.count("text") == 54
    assert "pre-flight" not in proc.stdout
    # with the pre-flight (the default) the same listing, then the doctor's lines, and a refusal
    checked = cli("grid", "--config", "configs/grids/paper_table1.yaml", "--dry-run")
    assert checked.returncode == 2 and checked.stdout.startswith(proc.stdout.split("pre-flight")[0][:2000])
    assert "clipit: error: pre-flight:" in checked.stderr and "--no-preflight" in checked.stderr
    assert "✗ shards: " in checked.stdout and "run `clipit prepare shards --grid configs/grids/paper_table1.yaml`" in (
        checked.stdout
    )


# ------------------------------------------------------------------------------- small grids


def write(tmp_path, text, name="g.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """name: t
base: {base}
root: {root}
seeds: [0, 1]
set:
  output_dir: "{{root}}/{{model}}/{{variant}}"
  data.root: "{{root}}/data/images"
  reports.path: "{{root}}/data/reports.jsonl"
  pairing.checkpoint: "{{root}}/data/demo-clip/model.safetensors"
  pairing.dir: "{{root}}/pairing"
  shards.dir: "{{root}}/shards"
axes:
  model:
    a: {{set: {{model.lora.r: 4}}}}
    b: {{set: {{model.lora.r: 8}}}}
  variant:
    full: {{}}
    lam0: {{set: {{methods.clipit.lam: 0.0}}, methods: [clipit], warm_start_from: full}}
"""


@pytest.fixture
def small(tmp_path):
    return write(tmp_path, BASE.format(base=ROOT / "configs/demo-tiny.yaml", root=tmp_path / "runs"))


def test_cells_overrides_and_templates(small, tmp_path):
    plan = expand(small)
    assert len(plan.cells) == 2 * 2 * (2 + 1) and len(plan.tasks) == 2 * 2 * 2
    cell = next(c for c in plan.cells if c.key == "model=b,variant=lam0,method=clipit,seed=1")
    cfg = cell.load()
    assert cfg.output_dir == str(tmp_path / "runs" / "b" / "lam0")
    assert cfg.model.lora.r == 8 and cfg.methods["clipit"].lam == 0.0 and cfg.seeds == [0, 1]
    assert cell.run_dir == str(tmp_path / "runs" / "b" / "lam0" / "runs" / "clipit" / "seed-1")
    assert cell.warm_start_link == str(tmp_path / "runs" / "b" / "full" / "runs" / "unimodal" / "seed-1")
    assert cell.command().startswith("clipit train --config ") and cell.command().endswith("--method clipit --seed 1")
    waiting = plan.tasks[[t.label for t in plan.tasks].index("model=b,variant=lam0,seed=1")]
    assert [plan.tasks[i].label for i in waiting.after] == ["model=b,variant=full,seed=1"]
    # CLI --set applies to every cell, after the grid's own overrides
    plan = expand(small, ["methods.clipit.epochs=7"])
    assert all(c.load().methods["clipit"].epochs == 7 for c in plan.cells)
    assert expand(small, root=str(tmp_path / "elsewhere")).root == str(tmp_path / "elsewhere")


@pytest.mark.parametrize(
    "value",
    [
        "runs/x",
        "1e-3",
        0.001,
        3,
        True,
        None,
        [0, 1],
        {"method": "text", "lr": 0.003},
        ["COAD", "READ"],
        "a: b",
        "{root}",
    ],
)
def test_override_strings_round_trip(value):
    raw = {}
    apply_override(raw, format_override("a.b", value))
    assert raw == {"a": {"b": value}}


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.replace("{{model}}/{{variant}}", "{{model}}"), "write the same run directory"),
        (lambda t: t.replace("{{model}}/", "{{modle}}/"), "unknown template field {modle}"),
        (lambda t: t.replace("warm_start_from: full", "warm_start_from: nope"), "warm_start_from = 'nope'"),
        (lambda t: t.replace(", warm_start_from: full", ""), "warm-starts from 'unimodal'"),
        (lambda t: t.replace("methods: [clipit]", "methods: [clipt]"), "method 'clipt' is not in"),
        (lambda t: t.replace("model.lora.r: 4", "model.lora.rank: 4"), "model.lora.rank"),
        (lambda t: t.replace("a: {{set:", "a: {{sett:"), "axes.model.a.sett"),
        (lambda t: t.replace("lam: 0.0}}", "lam: 0.0, data.root: /x}}"), "data differs"),
    ],
)
def test_grid_errors_name_the_problem(tmp_path, edit, message):
    path = write(tmp_path, edit(BASE).format(base=ROOT / "configs/demo-tiny.yaml", root=tmp_path / "runs"))
    with pytest.raises(ConfigError) as err:
        expand(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_reused_warm_start_must_match(tmp_path):
    text = BASE.replace("lam0: {{set: {{methods.clipit.lam: 0.0}}", "lam0: {{set: {{model.backbone: uni}}")
    path = write(tmp_path, text.format(base=ROOT / "configs/demo-tiny.yaml", root=tmp_path / "runs"))
    with pytest.raises(ConfigError, match="model.backbone differs"):
        expand(path)


def test_grid_needs_name_and_base(tmp_path):
    with pytest.raises(ConfigError, match="'base'"):
        load_grid(write(tmp_path, "name: x\n"))


def test_chunks_respect_max_array_size():
    assert chunk(list(range(2500)), 1001) == [list(range(1001)), list(range(1001, 2002)), list(range(2002, 2500))]
    profile = ClusterProfile(max_array_size=0)
    assert array_chunk_size(profile, 1001) == 1001  # the cluster's MaxArraySize
    assert array_chunk_size(profile, None) == 1000  # no scontrol: SLURM's default
    assert array_chunk_size(ClusterProfile(max_array_size=300), 1001) == 300
    assert array_chunk_size(ClusterProfile(max_array_size=5000), 1001) == 1001


def test_profile_becomes_sbatch_options(tmp_path, monkeypatch):
    """A profile becomes submitit's SLURM parameters and the #SBATCH lines of the script it would submit.
    Nothing is submitted, so no SLURM is needed: submitit only looks for `srun` on PATH before it builds a
    SLURM executor; where there is none, an `srun` that fails if ever run stands in for that check."""
    if shutil.which("srun") is None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "srun").write_text("#!/bin/sh\necho 'srun: no SLURM here (test_grid.py)' >&2\nexit 1\n")
        (bin_dir / "srun").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    profile = load_profile("gpu-cluster", {"account": "acct", "array_parallelism": 7})
    executor = make_executor(profile, tmp_path, "clipit-x", "slurm", dependency="afterok:12_0:12_1")
    params = executor._executor.parameters
    assert params["partition"] == "gpu" and params["account"] == "acct" and params["array_parallelism"] == 7
    assert params["gpus_per_node"] == 1 and params["cpus_per_task"] == 16 and params["time"] == 720
    assert params["dependency"] == "afterok:12_0:12_1"
    assert params["additional_parameters"]["kill_on_invalid_dep"] == "yes"
    assert params["signal_delay_s"] == 180
    assert any("CLIPIT_OFFLINE" in line for line in params["setup"])
    assert executor._executor.max_num_timeout == 20
    sbatch = executor._executor._make_submission_file_text("true", "uid").splitlines()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=acct",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --time=720",
        "#SBATCH --dependency=afterok:12_0:12_1",
        "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --signal=USR2@180",
    ):
        assert line in sbatch, (line, sbatch)


def test_profile_errors(tmp_path):
    with pytest.raises(ConfigError, match="cluster profile not found"):
        load_profile("no-such-profile")
    bad = write(tmp_path, "partition: gpu\ngpu_per_node: 4\n", "p.yaml")
    with pytest.raises(ConfigError, match="gpu_per_node"):
        load_profile(str(bad))
    assert yaml.safe_load((PROFILE_DIR / "local-cluster.yaml").read_text())["partition"] == "debug"


@pytest.mark.parametrize(
    "field, text",
    [("name", "name: ../escape"), ("axis", "axes: {'a/b': {x: {}}}"), ("value", "axes: {backbone: {'..': {}}}")],
)
def test_names_templated_into_paths_cannot_escape(tmp_path, field, text):
    grid = tmp_path / "g.yaml"
    body = {"name": "name: g", "axis": "axes: {backbone: {x: {}}}", "value": ""}
    lines = [f"base: {ROOT / 'configs' / 'demo-tiny.yaml'}", "seeds: [0]", text]
    lines += [v for k, v in body.items() if k != field and not (k == "axis" and field == "value")]
    if field != "name":
        lines.append("name: g")
    grid.write_text("\n".join(dict.fromkeys(lines)) + "\n")
    with pytest.raises(ConfigError, match="cannot name a folder"):
        load_grid(grid)

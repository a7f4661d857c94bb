"""Path keys in configs: ${VAR} and ${CONFIG_DIR} expansion, the one relative-path rule, --print-config."""

import pytest
import yaml

from clipit.config import ConfigError, load_config
from clipit.hpc.grid_file import load_grid
from clipit_testing import ROOT, cli


def write(tmp_path, text):
    path = tmp_path / "sub" / "exp.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_env_vars_and_config_dir_expand_in_path_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPIT_TEST_SCRATCH", "/scratch/me")
    path = write(
        tmp_path,
        "output_dir: ${CLIPIT_TEST_SCRATCH}/runs\nshards:\n  dir: ${CONFIG_DIR}/shards\n"
        "model:\n  weights_file: ~/weights.yaml\nname: ${CLIPIT_TEST_SCRATCH}\n",
    )
    cfg = load_config(path)
    assert cfg.output_dir == "/scratch/me/runs"
    assert cfg.shards.dir == str(path.parent.absolute() / "shards")
    assert not cfg.model.weights_file.startswith("~")
    assert cfg.name == "${CLIPIT_TEST_SCRATCH}"  # only path keys are expanded
    assert load_config(path, ["data.root=relative/images"]).data.root == "relative/images"  # relative to the cwd


def test_unset_or_unbraced_variables_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPIT_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"output_dir = .*CLIPIT_TEST_UNSET.*not set; export CLIPIT_TEST_UNSET"):
        load_config(write(tmp_path, "output_dir: ${CLIPIT_TEST_UNSET}/runs\n"))
    with pytest.raises(ConfigError, match=r"data.root .*write environment variables as \$\{NAME\}"):
        load_config(write(tmp_path, "data:\n  root: $HOME/images\n"))


def test_grid_root_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPIT_TEST_SCRATCH", str(tmp_path / "scratch"))
    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: g\nbase: {ROOT / 'configs/demo-tiny.yaml'}\nroot: ${{CLIPIT_TEST_SCRATCH}}/grids\n")
    assert load_grid(grid).root == str(tmp_path / "scratch" / "grids")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", "configs/demo-tiny.yaml", "--method", "clipit"],
        ["doctor", "configs/demo-tiny.yaml"],
        ["shard", "build", "--config", "configs/demo-tiny.yaml"],
    ],
)
def test_print_config_shows_the_resolved_config(argv):
    proc = cli(*argv, "--set", "methods.clipit.lr=0.5", "--print-config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["methods"]["clipit"]["lr"] == 0.5 and printed["shards"]["dir"]  # resolved: defaults filled
    assert "demo finished" not in proc.stdout and len(proc.stdout.splitlines()) > 20  # printed, nothing run


def test_print_config_of_a_grid():
    proc = cli("grid", "--config", "configs/grids/demo.yaml", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["name"] == "demo"

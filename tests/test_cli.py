"""The one command line: `clipit` and `python -m clipit`, the shared flags, one-line errors with --debug."""

import subprocess
import sys

import pytest

from clipit import __version__
from clipit.cli import build_parser, main
from clipit_testing import ROOT, TINY, cli, run_clipit


def test_python_m_clipit_and_version():
    proc = run_clipit("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"clipit {__version__}"


@pytest.mark.parametrize(
    "wrapper, command",
    [
        ("launchers/reproduce.py", "clipit reproduce"),
        ("launchers/grid.py", "clipit grid"),
        ("launchers/pair.py", "clipit prepare pair"),
        ("launchers/shards.py", "clipit prepare shards"),
        ("shards/build.py", "clipit shard build"),
    ],
)
def test_scripts_are_the_subcommands(wrapper, command):
    """The scripts users run by path are the subcommands (same flags, same help), with no sys.path hack."""
    proc = subprocess.run([sys.executable, wrapper, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {command} ")
    assert "sys.path" not in (ROOT / wrapper).read_text()


def test_config_flags_are_the_same_everywhere():
    parser = build_parser()
    for argv in (
        ["demo"],
        ["pair"],
        ["shard", "build"],
        ["train", "--method", "m"],
        ["evaluate", "--method", "m"],
        ["grid"],
        ["doctor"],
    ):
        args = parser.parse_args([*argv, "--config", "c.yaml", "--set", "a=1", "--set", "b=2"])
        assert args.config == "c.yaml" and args.set == ["a=1", "b=2"], argv
    for argv in (
        ["grid", "--config", "g.yaml"],
        ["prepare", "pair", "--grid", "g.yaml"],
        ["prepare", "shards", "--config", "c.yaml"],
        ["reproduce", "--grid", "g.yaml"],
    ):
        args = parser.parse_args([*argv, "--profile", "p", "--dry-run"])
        assert args.profile == "p" and args.dry_run and not args.local, argv


def test_a_real_process_prints_one_line_for_a_user_error(tmp_path):
    """The one-line contract end to end, in a real `python -m clipit` process: exit 2, one line, no traceback
    (the other tests call the command line in-process)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: {m: {method: unimodal}}\nseeds: [0]\n")
    proc = run_clipit("train", "--config", str(bad), "--method", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "clipit: error: --method 'nope' is not in the config's methods; choose one of ['m']"
    ]


def test_help_lists_the_valid_names():
    proc = cli("train", "--help")
    assert proc.returncode == 0
    for name in ("unimodal", "late_fusion", "kaiko-vitl14", "uni", "pcam", "bach", "docs/config.md"):
        assert name in proc.stdout


def test_help_shows_variables_as_they_are_written():
    text = cli("train", "--help").stdout
    assert "${VAR} and ${CONFIG_DIR} are expanded" in " ".join(text.split()) and "${{" not in text


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: {m: {method: unimodal}}\nseeds: [0]\n")
    assert main(["train", "--config", str(bad), "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--method 'nope' is not in the config's methods; choose one of ['m']" in err
    assert main(["--debug", "train", "--config", str(bad), "--method", "nope"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert main(["train", "--config", str(bad), "--method", "nope", "--debug"]) == 2  # after the subcommand too
    assert "Traceback" in capsys.readouterr().err


def test_evaluate_names_the_command_that_trains_first(tmp_path, capsys):
    assert (
        main(["evaluate", "--config", TINY, "--method", "unimodal", "--seed", "0", "--set", f"output_dir={tmp_path}"])
        == 2
    )
    err = capsys.readouterr().err
    assert "unimodal seed 0 is not trained; run `clipit train --config <config> --method unimodal --seed 0`" in err


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_evaluate_a_trained_run_on_val(tmp_path, tiny_shards):
    out = tmp_path / "out"
    sets = [a for s in [f"output_dir={out}", *tiny_shards] for a in ("--set", s)]
    assert cli("train", "--config", TINY, "--method", "unimodal", "--seed", "0", *sets).returncode == 0
    proc = cli("evaluate", "--config", TINY, "--method", "unimodal", "--seed", "0", "--split", "val", *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unimodal seed 0 val: balanced accuracy" in proc.stdout
    run = out / "runs" / "unimodal" / "seed-0"
    assert (run / "metrics-val.json").exists() and (run / "predictions-val.npz").exists()
    assert (run / "metrics.json").exists()  # the test metrics from train are untouched

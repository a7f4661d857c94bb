"""Path keys that would silently become the wrong folder stop at load with one line naming the key."""

import pytest

from clipit.config import ConfigError, load_config
from clipit_testing import cli_main


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_tilde_of_an_unknown_user_is_refused_not_made_a_literal_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "output_dir: ~nosuchuser_clipit/runs\n")
    with pytest.raises(
        ConfigError, match=r"output_dir = '~nosuchuser_clipit/runs': there is no user 'nosuchuser_clipit'"
    ):
        load_config(path)
    assert cli_main(["prepare", "demo", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no user 'nosuchuser_clipit'" in err[0]
    assert not any(tmp_path.glob("~*"))  # no folder literally named ~nosuchuser_clipit


def test_tilde_of_the_own_home_and_of_a_known_user_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(write(tmp_path, "output_dir: ~/runs\nshards:\n  dir: ~root/shards\n"))
    assert cfg.output_dir == str(tmp_path / "home" / "runs")
    assert not cfg.shards.dir.startswith("~")


def test_a_variable_whose_value_holds_a_dollar_is_not_called_unexpanded(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPIT_TEST_ODD", "/scratch/$weird$dir")
    cfg = load_config(write(tmp_path, "output_dir: ${CLIPIT_TEST_ODD}/runs\n"))
    assert cfg.output_dir == "/scratch/$weird$dir/runs"
    with pytest.raises(ConfigError, match=r"write environment variables as \$\{NAME\}"):
        load_config(write(tmp_path, "output_dir: ${CLIPIT_TEST_ODD}/$OTHER\n"))

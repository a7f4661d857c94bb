"""Bad config values end as one line naming the file, the key and the valid range (exit 2, no
traceback, nothing written), checked when the config loads, whatever command loads it."""

import dataclasses
import typing

import pytest
import yaml

from clipit import config as C
from clipit import typed_yaml
from clipit_testing import ROOT, TINY, cli


def one_error(proc) -> str:
    """The contract of a user-fixable fault: exit 2, one stderr line `clipit: error: ...`, no traceback."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("clipit: error: "), proc.stderr
    return lines[0].removeprefix("clipit: error: ")


def pair(tmp_path, *sets, config=TINY):
    """`clipit pair` on a config with overrides; output_dir in tmp_path, so anything written shows."""
    args = ["pair", "--config", str(config), "--set", f"output_dir={tmp_path / 'out'}"]
    for s in sets:
        args += ["--set", s]
    return cli(*args)


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "override,key,valid",
    [
        ("methods.clipit.epochs=0", "methods.clipit.epochs", "> 0"),  # trained one step before
        ("methods.clipit.batch_size=0", "methods.clipit.batch_size", ">= 1"),
        ("methods.clipit.evals_per_epoch=0", "methods.clipit.evals_per_epoch", ">= 1"),
        ("methods.clipit.num_workers=-1", "methods.clipit.num_workers", ">= 0"),
        ("methods.clipit.lr=0", "methods.clipit.lr", "> 0"),
        ("methods.clipit.weight_decay=-0.1", "methods.clipit.weight_decay", ">= 0"),
        ("methods.clipit.min_lr=-1e-5", "methods.clipit.min_lr", ">= 0"),
        ("methods.clipit.grad_clip=-1", "methods.clipit.grad_clip", ">= 0"),
        ("methods.clipit.lam=-1", "methods.clipit.lam", ">= 0"),
        ("methods.clipit.word_drop=1", "methods.clipit.word_drop", "in [0, 1)"),
        ("model.lora.r=0", "model.lora.r", ">= 1"),
        ("model.lora.alpha=0", "model.lora.alpha", ">= 1"),
        ("model.lora.dropout=1.0", "model.lora.dropout", "in [0, 1)"),
        ("model.image_size=4", "model.image_size", ">= 8"),
        ("model.kd_layers=3", "model.kd_layers", "in [1, 2]"),
        ("shards.samples_per_shard=0", "shards.samples_per_shard", ">= 1"),
        ("pairing.top_k=0", "pairing.top_k", ">= 1"),
        ("pairing.batch_size=0", "pairing.batch_size", ">= 1"),
        ("data.demo.counts={train: 0, val: 8, test: 8}", "data.demo.counts.train", ">= 1"),
        ("data.expected_sizes={train: 0}", "data.expected_sizes.train", ">= 1"),
    ],
)
def test_out_of_range_value_names_file_key_and_range(tmp_path, override, key, valid):
    line = one_error(pair(tmp_path, override))
    assert line.startswith(f"{TINY}: {key} = ") and line.endswith(f"must be {valid}"), line
    assert not (tmp_path / "out").exists()  # rejected before any stage ran


@pytest.mark.parametrize(
    "where,key",
    [
        ("file", "methods.clipit.lam"),  # `lam: .nan` was accepted
        ("file", "methods.clipit.lr"),
        ("set", "methods.clipit.lam"),
        ("set", "methods.clipit.lr"),
    ],
)
def test_nan_and_inf_are_never_valid(tmp_path, where, key):
    value = ".nan" if key.endswith("lam") else ".inf"
    if where == "file":
        raw = yaml.safe_load((ROOT / TINY).read_text())
        raw["methods"]["clipit"][key.rsplit(".", 1)[1]] = float(value.replace(".", ""))
        config, sets = write(tmp_path, yaml.safe_dump(raw)), []
    else:
        config, sets = TINY, [f"{key}={'nan' if value == '.nan' else '-inf'}"]
    line = one_error(pair(tmp_path, *sets, config=config))
    assert f"{key} = " in line and "must be a finite number" in line and str(config) in line
    assert line.endswith(">= 0" if key.endswith("lam") else "> 0")


def test_empty_seeds_is_an_error_not_a_run_of_nothing(tmp_path):
    """`seeds: []` trained nothing and exited 0."""
    proc = cli(
        "train", "--config", TINY, "--method", "clipit", "--set", f"output_dir={tmp_path / 'out'}", "--set", "seeds=[]"
    )
    assert one_error(proc) == f"{TINY}: seeds = [] must not be empty"
    assert not (tmp_path / "out").exists()


def test_repeated_seed_is_an_error(tmp_path):
    assert one_error(pair(tmp_path, "seeds=[0, 1, 0]")) == f"{TINY}: seeds = [0, 1, 0] repeats an item; list each once"


def test_float_written_1e_minus_3_is_a_float(tmp_path):
    """YAML 1.1 reads `1e-3` (no dot) as a string; a float key takes it, in the file and in --set. The
    config then loads: the command stops at its own, later check (nothing is trained here)."""
    raw = yaml.safe_load((ROOT / TINY).read_text())
    raw["methods"]["clipit"]["weight_decay"] = "5e-5"
    config = write(tmp_path, yaml.safe_dump(raw))
    cfg = C.load_config(config, ["methods.clipit.lr=1e-3"])
    assert cfg.methods["clipit"].lr == 1e-3 and cfg.methods["clipit"].weight_decay == 5e-5
    proc = cli(
        "evaluate",
        "--config",
        str(config),
        "--method",
        "clipit",
        "--seed",
        "0",
        "--set",
        f"output_dir={tmp_path / 'out'}",
        "--set",
        "methods.clipit.lr=1e-3",
    )
    assert "clipit seed 0 is not trained" in one_error(proc)  # past the config: the next check speaks


def test_exponent_text_is_not_a_number_for_int_or_str_keys(tmp_path):
    """Only float keys read text as a number: an int key still wants an integer, a str key keeps text."""
    line = one_error(pair(tmp_path, "methods.clipit.batch_size=1e3"))
    assert line == f"{TINY}: methods.clipit.batch_size must be int, got '1e3' (str)"
    assert C.load_config(ROOT / TINY, ["name=1e-3"]).name == "1e-3"
    assert "methods.clipit.lr must be a number, got 'fast'" in one_error(pair(tmp_path, "methods.clipit.lr=fast"))


@pytest.mark.parametrize(
    "override,expected",
    [
        ("seeds=[0", "override --set 'seeds=[0': the value is not valid YAML"),
        ("methods.clipit.lr={", "override --set 'methods.clipit.lr={': the value is not valid YAML"),
        ("seeds", "override 'seeds' must look like section.key=value"),
        ("methods..lr=1", "override 'methods..lr=1' must look like section.key=value"),
    ],
)
def test_malformed_override_names_the_override(tmp_path, override, expected):
    line = one_error(pair(tmp_path, override))
    assert line.startswith(f"{TINY}: {expected}"), line


def test_use_rank_needs_that_many_paired_texts(tmp_path):
    line = one_error(pair(tmp_path, "pairing.top_k=2", "shards.use_rank=3"))
    assert line == (
        f"{TINY}: shards.use_rank = 3 needs pairing.top_k >= 3 (it is 2); raise pairing.top_k or lower shards.use_rank"
    )
    C.load_config(ROOT / TINY, ["pairing.top_k=2", "shards.use_rank=3", "shards.random_report_seed=0"])  # unused


@pytest.mark.parametrize(
    "sets,expected",
    [
        (
            ["methods.clipit.optimizer=sgd", "methods.clipit.momentum=0"],
            "methods.clipit.momentum = 0 with optimizer sgd",
        ),
        (
            ["methods.clipit.schedule=cosine", "methods.clipit.lr=1e-4", "methods.clipit.min_lr=1e-3"],
            "methods.clipit.min_lr = 0.001 is above lr = 0.0001",
        ),
    ],
)
def test_settings_that_contradict_each_other(tmp_path, sets, expected):
    assert one_error(pair(tmp_path, *sets)).startswith(f"{TINY}: {expected}")


def test_unknown_text_encoding_is_a_load_error(tmp_path):
    line = one_error(pair(tmp_path, "reports.encoding=klingon"))
    assert line.startswith(f"{TINY}: reports.encoding = 'klingon' is not a text encoding")


def test_config_file_that_is_not_utf8_or_not_a_file(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: d\xe9mo\n".encode("latin-1"))
    line = one_error(pair(tmp_path, config=latin))
    assert line == f"{latin}: config file is not UTF-8 text (byte 0xe9 at offset 7); save it as UTF-8"
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert one_error(pair(tmp_path, config=folder)).startswith(f"{folder}: cannot read the config file")


def _ranged_fields():
    """Every key with a Range, its dotted name and a value just outside the range."""
    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            base = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(base):
                walk(base, f"{prefix}{f.name}.")
                continue
            for rule in typed_yaml.rules_of(tp):
                if isinstance(rule, typed_yaml.Range):
                    bad = (
                        rule.ge - 1
                        if rule.ge is not None
                        else rule.gt
                        if rule.gt is not None
                        else rule.le + 1
                        if rule.le is not None
                        else rule.lt
                    )
                    out.append((f"{prefix}{f.name}", rule, bad))

    walk(C.ExperimentConfig, "")
    walk(C.TrainConfig, "methods.m.")
    return out


RANGED = _ranged_fields()


@pytest.mark.parametrize("key,rule,bad", RANGED, ids=[k for k, _, _ in RANGED])
def test_every_range_is_enforced_and_documented(tmp_path, key, rule, bad):
    """One home: the range written on the field is what the loader rejects and what docs/config.md shows."""
    row = next(
        line
        for line in (ROOT / "docs" / "config.md").read_text().splitlines()
        if line.startswith(f"| `{key.replace('methods.m.', 'methods.<name>.')}` |")
    )
    assert f"| {rule.text()} |" in row, row
    path = write(tmp_path, "methods:\n  m: {method: clipit}\n")
    with pytest.raises(C.ConfigError) as err:
        C.load_config(path, [f"{key}={bad}"])
    assert f"{path}: {key} = " in str(err.value) and str(err.value).endswith(f"must be {rule.text()}")

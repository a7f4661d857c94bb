import pytest

from clipit.config import ConfigError, ExperimentConfig, load_config
from clipit_testing import ROOT

EXPERIMENT_CONFIGS = sorted(
    p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("weights.")
)  # weights files: tests/models/test_weights.py


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_experiment_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    for name, method in cfg.methods.items():
        assert method.warm_start is None or method.warm_start in cfg.methods, name


def test_shipped_configs_exist():
    assert EXPERIMENT_CONFIGS, "configs/*.yaml should not be empty"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_values_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "seeds: [3, 4]\nmethods:\n  m: {method: unimodal, lr: 1, epochs: 2}\n"))
    assert cfg.seeds == [3, 4]
    assert isinstance(cfg.methods["m"].lr, float) and cfg.methods["m"].lr == 1.0
    assert cfg.model.lora.r == 16  # defaults fill what the file leaves out


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "model:\n  backbone: x\n  lora: {rank: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "model.lora.rank" in str(err.value)


@pytest.mark.parametrize(
    "text,key",
    [
        ("seeds: 3\n", "seeds"),
        ("methods:\n  m: {epochs: many}\n", "methods.m.epochs"),
        ("model: {lora: {enabled: 'yes'}}\n", "model.lora.enabled"),
        ("methods:\n  m: {optimizer: lion}\n", "methods.m.optimizer"),
        ("model: {lora: {targets: [Linear, MLP]}}\n", "model.lora.targets[1]"),
        ("shards: [1]\n", "shards"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_overrides_apply_before_typing(tmp_path):
    path = write(tmp_path, "methods:\n  m: {lr: 0.1}\n")
    cfg = load_config(path, ["methods.m.lr=0.5", "model.lora.r=4", "seeds=[7]"])
    assert cfg.methods["m"].lr == 0.5 and cfg.model.lora.r == 4 and cfg.seeds == [7]
    with pytest.raises(ConfigError, match="model.lora.r"):
        load_config(path, ["model.lora.r=four"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))


def test_config_reference_is_current():
    """docs/config.md is generated from the dataclasses; regenerate it when a field changes."""
    from clipit.config_reference import reference

    assert (ROOT / "docs" / "config.md").read_text() == reference() + "\n", (
        "docs/config.md is stale: python -m clipit.config_reference > docs/config.md"
    )


def test_warm_start_graph_is_checked_at_load(tmp_path):
    cycle = "methods:\n  a: {method: clipit, warm_start: b}\n  b: {method: clipit, warm_start: a}\n"
    with pytest.raises(ConfigError, match="warm_start cycle: a -> b -> a"):
        load_config(write(tmp_path, cycle))
    with pytest.raises(ConfigError, match="methods.a warm-starts from unknown method 'probe'"):
        load_config(write(tmp_path, "methods:\n  a: {method: clipit, warm_start: probe}\n"))
    with pytest.raises(ConfigError, match="methods.l.text_warm_start = 't' needs warm_start too"):
        load_config(write(tmp_path, "methods:\n  t: {method: text}\n  l: {method: late_fusion, text_warm_start: t}\n"))


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", "x..y"])
def test_method_names_cannot_leave_the_runs_folder(tmp_path, name):
    with pytest.raises(ConfigError, match="cannot name a folder"):
        load_config(write(tmp_path, f"methods:\n  '{name}': {{method: unimodal}}\n"))

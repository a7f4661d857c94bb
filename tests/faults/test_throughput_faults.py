"""A gpu-check throughput file that is garbled or holds zero, negative or non-numeric rates stops the
cost dry-run with one line naming the file and the key, instead of a traceback or a cost priced from it."""

import json

import pytest

from clipit.config import ConfigError
from clipit.hpc.throughput import load_throughput

GOOD_ROW = {"backbone": "demo-vit-tiny", "images_per_s": 1000.0, "forward_images_per_s": 4000.0, "mfu": 0.5}


def measured(tmp_path, **fields):
    path = tmp_path / "gpu-check.json"
    path.write_text(json.dumps({"device": "test", "train_step": [GOOD_ROW]} | fields))
    return path


def test_a_good_file_loads(tmp_path):
    assert load_throughput(measured(tmp_path, peak_flops=1e15)).source.startswith("measured")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"peak_flops": -2.5}, "peak_flops = -2.5 is not a positive finite number"),
        ({"loader_samples_per_s": 0}, "loader_samples_per_s = 0 is not a positive finite number"),
        ({"conch_images_per_s": "fast"}, "conch_images_per_s = 'fast' is not a positive finite number"),
        ({"train_step": [GOOD_ROW | {"images_per_s": -5}]}, "train_step[demo-vit-tiny].images_per_s = -5 is not"),
        ({"train_step": [GOOD_ROW | {"mfu": 1.7}]}, "train_step[demo-vit-tiny].mfu = 1.7 is not a fraction in (0, 1]"),
        ({"train_step": [{"images_per_s": 3.0}]}, "train_step is not a list of rows naming their backbone"),
        ({"train_step": {"a": 1}}, "train_step is not a list of rows naming their backbone"),
        ({"train_step": [{"backbone": "x"}]}, "train_step[x].images_per_s = None is not a positive finite number"),
    ],
)
def test_bad_rates_are_one_line_naming_file_and_key(tmp_path, fields, message):
    path = measured(tmp_path, **fields)
    with pytest.raises(ConfigError) as err:
        load_throughput(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).endswith("rerun `make gpu-check`")


@pytest.mark.parametrize("text", ["{", "[1, 2]", "\xff\xfe"])
def test_a_garbled_file_is_one_line(tmp_path, text):
    path = tmp_path / "gpu-check.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{path}: not a gpu-check result: .*; rerun `make gpu-check`$"):
        load_throughput(path)

"""An export whose files were damaged or edited: one line naming the file, the key and the fix (re-export),
never a failure far away under another name, and never advice about keys the command does not have."""

import json
import os
import shutil

import pytest

from clipit.evaluation.export import export_run
from clipit_testing import cli_main


def copy(demo_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(demo_export, out)
    return out


def predict(export, tmp_path, capsys) -> str:
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 120, 170)).save(tmp_path / "tile.png")
    code = cli_main(["predict", str(export), str(tmp_path / "tile.png"), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert not (tmp_path / "p.csv").exists()
    return err[0]


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        ("input_size", 0, "a side in pixels from 1 to 8192"),
        ("input_size", "64", "a side in pixels from 1 to 8192"),
        ("mean", [0.5, 0.5], "3 finite numbers (one per RGB channel)"),
        ("std", [0.2, 0.0, 0.2], "3 positive numbers"),
        ("std", [0.2, float("nan"), 0.2], "3 finite numbers"),
        ("classes", ["tumor"], "a list of at least 2 class names"),
        ("field_um", -112.0, "a positive number of µm (or null)"),
        ("timm_kwargs", ["dynamic_img_size"], "a mapping of timm create_model options"),
    ],
)
def test_an_edited_config_json_names_the_key(demo_export, tmp_path, capsys, key, value, what):
    export = copy(demo_export, tmp_path)
    config = json.loads((export / "config.json").read_text())
    config[key] = value
    (export / "config.json").write_text(json.dumps(config))
    line = predict(export, tmp_path, capsys)
    assert line.startswith(f"clipit: error: {export / 'config.json'}: {key} = ")
    assert what in line and line.endswith("re-export with `clipit export RUN_DIR OUT_DIR`")


def test_a_weights_file_that_is_not_a_file_is_not_called_missing(demo_export, tmp_path, capsys):
    export = copy(demo_export, tmp_path)
    (export / "model.safetensors").unlink()
    os.mkfifo(export / "model.safetensors")
    line = predict(export, tmp_path, capsys)
    assert line == (
        f"clipit: error: {export / 'model.safetensors'}: not a regular file; re-export with "
        "`clipit export RUN_DIR OUT_DIR`"
    )
    assert "train the run first" not in line


def test_a_truncated_weights_file_says_re_export(demo_export, tmp_path, capsys):
    export = copy(demo_export, tmp_path)
    data = (export / "model.safetensors").read_bytes()
    (export / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = predict(export, tmp_path, capsys)
    assert "not a readable safetensors file" in line and line.endswith("re-export with `clipit export RUN_DIR OUT_DIR`")


def test_export_write_faults_name_its_out_dir_not_a_config_key(demo_export, tmp_path):
    """`clipit export` has no output_dir: a read-only target says to give it another OUT_DIR."""
    from clipit.errors import OutputError

    run = next(demo_export.parent.glob("runs/*/seed-*"))
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0 or os.system(f"mount --bind {target} {target} && mount -o remount,ro,bind {target}") != 0:
        pytest.skip("a read-only bind mount needs root")
    try:
        with pytest.raises(OutputError) as err:
            export_run(run, target / "export")
    finally:
        os.system(f"umount -l {target}")
    assert "give `clipit export` another OUT_DIR" in str(err.value) and "output_dir" not in str(err.value)

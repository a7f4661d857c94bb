"""A finished run is reused only under the config that made it: a rerun of `clipit train` or `clipit evaluate`
with a changed setting stops with one line naming the changed key and the ways forward; the same rerun
with the same config still skips; `--overwrite` replaces only a run of another config, `--resume none` any."""

import json

from clipit_testing import ROOT, TINY, cli_main

EPOCHS = "methods.unimodal.epochs=1"


def run(capsys, command: str, out, shards, *extra: str) -> tuple[int, str, list[str]]:
    sets = [f"output_dir={out}", *shards, EPOCHS, *(e for e in extra if not e.startswith("--"))]
    flags = [e for e in extra if e.startswith("--")]
    argv = [command, "--config", str(ROOT / TINY), "--method", "unimodal", "--seed", "0", *flags]
    code = cli_main(argv + [a for s in sets for a in ("--set", s)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_a_changed_setting_is_named_not_answered_with_the_old_result(tiny_shards, tmp_path, capsys):
    out = tmp_path / "out"
    summary = out / "runs" / "unimodal" / "seed-0" / "train_summary.json"
    code, printed, _ = run(capsys, "train", out, tiny_shards)
    assert code == 0 and "unimodal seed 0: balanced accuracy" in printed
    first = json.loads(summary.read_text())
    assert first["identity"]["methods"]["unimodal"]["epochs"] == 1

    code, again, _ = run(capsys, "train", out, tiny_shards)  # the same config: skipped, the same numbers
    result = printed.strip().splitlines()[-1]
    assert code == 0 and again.strip().splitlines()[-1] == result and json.loads(summary.read_text()) == first
    assert "training on" not in again

    for command in ("train", "evaluate"):
        code, _, err = run(capsys, command, out, tiny_shards, "methods.unimodal.lr=0.5")
        assert code == 2 and len(err) == 1, err
        assert f"{summary}: unimodal seed 0 finished under another config (methods.unimodal.lr: " in err[0]
        assert "set output_dir to a new folder" in err[0] and "with `--overwrite`" in err[0]
    code, _, err = run(capsys, "train", out, tiny_shards, "model.lora.r=4")
    assert code == 2 and "model.lora.r: 8 then, 4 now" in err[0]


def test_resume_none_replaces_a_run_made_under_another_config(tiny_shards, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "train", out, tiny_shards)[0] == 0
    sets = [f"output_dir={out}", *tiny_shards, EPOCHS, "methods.unimodal.lr=0.5"]
    argv = ["train", "--config", str(ROOT / TINY), "--method", "unimodal", "--seed", "0", "--resume", "none"]
    assert cli_main(argv + [a for s in sets for a in ("--set", s)]) == 0
    capsys.readouterr()
    summary = json.loads((out / "runs" / "unimodal" / "seed-0" / "train_summary.json").read_text())
    assert summary["identity"]["methods"]["unimodal"]["lr"] == 0.5
    code, _, _ = run(capsys, "evaluate", out, tiny_shards, "methods.unimodal.lr=0.5")
    assert code == 0


def test_overwrite_keeps_a_current_run_and_replaces_one_of_another_config(tiny_shards, tmp_path, capsys):
    out = tmp_path / "out"
    summary = out / "runs" / "unimodal" / "seed-0" / "train_summary.json"
    assert run(capsys, "train", out, tiny_shards)[0] == 0
    first = json.loads(summary.read_text())
    code, printed, _ = run(capsys, "train", out, tiny_shards, "--overwrite")  # current: kept as it is
    assert code == 0 and "--overwrite: replacing" not in printed and json.loads(summary.read_text()) == first

    code, printed, _ = run(capsys, "train", out, tiny_shards, "methods.unimodal.lr=0.5", "--overwrite")
    assert (
        code == 0
        and "--overwrite: replacing unimodal seed 0, made under another config (methods.unimodal.lr: " in printed
    )
    assert json.loads(summary.read_text())["identity"]["methods"]["unimodal"]["lr"] == 0.5


def test_settings_added_later_are_left_out_at_their_default_and_compared_otherwise():
    """A run recorded before ce_input/t_max/augment_policy/train_head existed stays current under their
    defaults (the behaviour it was trained with); a strict-profile value is part of the identity."""
    from clipit.config import load_config
    from clipit.training.run_identity import LATER_DEFAULTS, run_identity

    cfg = load_config("configs/demo-tiny.yaml")
    method = next(iter(cfg.methods))
    recorded = run_identity(cfg, method, 0, {}, 1, None)["methods"][method]
    assert set(LATER_DEFAULTS) == {"t_max", "ce_input", "augment_policy", "train_head"}
    assert not set(LATER_DEFAULTS) & set(recorded)
    cfg.methods[method].ce_input = "softmax"
    assert run_identity(cfg, method, 0, {}, 1, None)["methods"][method]["ce_input"] == "softmax"

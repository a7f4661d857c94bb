"""Run identity everywhere (docs/reliability.md, "Reruns"): every stage that reuses its output because it
exists compares the identity the output records with the one requested now. The same config reuses it;
a changed setting stops with one line naming the changed key and the ways forward (another folder, or
`--overwrite`); `--overwrite` replaces it. The grid's dry run shows such cells as changed, not done.

The stages run on the session's tiny demo (conftest.py): read in place where a rerun only reads, copied
where it writes."""

import json
import shutil
from pathlib import Path

import pytest

from clipit_testing import ROOT, TINY, cli, shard_copy, with_shards


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("clipit: error: ")
    return lines[0]


def sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def setting(overrides: list[str], key: str) -> Path:
    return Path(next(o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")))


# ---------------------------------------------------------------------------------------------- the one home


def test_identity_changes_name_each_key_old_and_new():
    from clipit.identity import changed_keys, check_unchanged, identity_changes

    then = {"methods": {"clipit": {"lr": 0.001, "lam": 1.0}}, "seed": 0, "gone": 1}
    now = {"methods": {"clipit": {"lr": 0.5, "lam": 1.0}}, "seed": 0, "new": [1, 2]}
    assert changed_keys(then, now) == ["gone", "methods.clipit.lr", "new"]
    assert identity_changes(then, now) == (
        "gone: 1 then, '<unset>' now, methods.clipit.lr: 0.001 then, 0.5 now, new: '<unset>' then, [1, 2] now"
    )
    assert identity_changes(then, then) == "" and identity_changes({"x": float("nan")}, {"x": float("nan")}) == ""
    check_unchanged("f.json", None, now, "made", "keep", "replace")  # recorded no identity: the caller decides
    with pytest.raises(ValueError, match=r"^f.json: it was made under another config \(.*methods.clipit.lr: "):
        check_unchanged("f.json", then, now, "it was made", "use another folder", "rerun with `--overwrite`")


# ---------------------------------------------------------------------------------------------- pairing, shards


def test_pairing_rerun_compares_its_identity(tiny_shards, tmp_path):
    pairing = tmp_path / "pairing"
    shutil.copytree(setting(tiny_shards, "pairing.dir"), pairing)
    base = [*tiny_shards, f"pairing.dir={pairing}", f"output_dir={tmp_path}"]
    before = (pairing / "pairs-train.npz").read_bytes()

    same = cli("pair", "--config", TINY, *sets(*base))
    assert same.code == 0, same.stderr[-2000:]
    assert (pairing / "pairs-train.npz").read_bytes() == before  # reused, not recomputed

    changed = one_error_line(cli("pair", "--config", TINY, *sets(*base, "pairing.top_k=1")))
    assert f"{pairing / 'pairs-train.npz'}: the train pairs were made under another config (" in changed
    assert "pairing.top_k: 2 then, 1 now" in changed
    assert "set pairing.dir to a new folder" in changed and "`--overwrite`" in changed
    assert (pairing / "pairs-train.npz").read_bytes() == before


@pytest.mark.slow  # pairs the tiny demo again (~25 s on 2 cores)
def test_overwritten_pairs_are_current_and_stop_the_shards_made_from_the_old_ones(tiny_shards, tmp_path):
    pairing = tmp_path / "pairing"
    shutil.copytree(setting(tiny_shards, "pairing.dir"), pairing)
    base = [*tiny_shards, f"pairing.dir={pairing}", f"output_dir={tmp_path}"]
    replaced = cli("pair", "--config", TINY, "--overwrite", *sets(*base, "pairing.top_k=1"))
    assert replaced.code == 0, replaced.stderr[-2000:]
    meta = json.loads(str(__import__("numpy").load(pairing / "pairs-train.npz")["meta"]))
    assert meta["identity"]["pairing"]["top_k"] == 1
    assert cli("pair", "--config", TINY, *sets(*base, "pairing.top_k=1")).code == 0  # now current

    # the shard set made from the old pairs: named by the pairs' changed key
    shards = shard_copy(tiny_shards, tmp_path)
    built = cli("shard", "build", "--config", TINY, *sets(*with_shards(base, shards), "pairing.top_k=1"))
    line = one_error_line(built)
    assert f"the shards in {shards} were built under another config (" in line
    assert "paired_under.pairing.top_k: 2 then, 1 now" in line


def test_shard_rerun_compares_its_identity(tiny_shards, tmp_path):
    shards = shard_copy(tiny_shards, tmp_path)
    base = [*with_shards(tiny_shards, shards), f"output_dir={tmp_path}"]
    before = {p.name: p.read_bytes() for p in sorted((shards / "train").glob("*.tar"))}

    same = cli("shard", "build", "--config", TINY, *sets(*base))
    assert same.code == 0 and same.stdout.strip() == str(shards / "manifest.json"), same.stderr[-2000:]

    line = one_error_line(cli("shard", "build", "--config", TINY, *sets(*base, "shards.samples_per_shard=32")))
    assert f"{shards / 'manifest.json'}: the shards in {shards} were built under another config (" in line
    assert "shards.samples_per_shard: 64 then, 32 now" in line
    assert "set shards.dir to a new folder" in line and "`--overwrite`" in line
    assert {p.name: p.read_bytes() for p in sorted((shards / "train").glob("*.tar"))} == before

    part = cli("shard", "build", "--config", TINY, "--overwrite", "--part", "0", "--num-parts", "2", *sets(*base))
    assert "--overwrite replaces a whole shard set" in one_error_line(part)

    replaced = cli("shard", "build", "--config", TINY, "--overwrite", *sets(*base, "shards.samples_per_shard=32"))
    assert replaced.code == 0, replaced.stderr[-2000:]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["samples_per_shard"] == 32 and len(list((shards / "train").glob("*.tar"))) == 256 // 32
    ok = cli("shard", "validate", str(shards))
    assert ok.code == 0, ok.stderr


def test_demo_images_of_other_settings_are_not_regenerated_silently(tiny_shards, tmp_path):
    data = setting(tiny_shards, "data.root")
    record = (data / "demo_meta.json").read_text()
    line = one_error_line(cli("prepare", "demo", "--config", TINY, *sets(*tiny_shards, "data.demo.seed=5")))
    assert f"{data / 'demo_meta.json'}: the demo images in {data} were generated under another config (" in line
    assert "data.demo.seed: 0 then, 5 now" in line and "`clipit prepare demo --config <config> --overwrite`" in line
    assert (data / "demo_meta.json").read_text() == record
    assert cli("prepare", "demo", "--config", TINY, *sets(*tiny_shards)).code == 0  # same settings: kept


def test_feature_cache_must_record_the_identity_its_key_was_made_from(tmp_path):
    from clipit.training.feature_files import FeatureCacheError, check_cache_identity

    identity = {"backbone": {"name": "demo-vit-tiny"}, "precision": "fp32"}
    check_cache_identity(tmp_path, {"identity": identity}, identity)
    with pytest.raises(FeatureCacheError, match=r"another identity than its key \(precision: 'fp32' then, 'bf16'"):
        check_cache_identity(tmp_path, {"identity": identity}, identity | {"precision": "bf16"})


# ---------------------------------------------------------------------------------------------- evaluate, export


def test_metrics_of_another_test_split_are_named(resume_cell, tiny_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(resume_cell / "runs", out / "runs")
    shards = shard_copy(tiny_shards, tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["test"]["shards"][0]["sha256"] = "0" * 64  # the test split rebuilt after evaluation
    (shards / "manifest.json").write_text(json.dumps(manifest))
    from clipit_testing import RESUME_CELL

    argv = ["evaluate", "--config", TINY, "--method", "clipit", "--seed", "0"]
    base = [f"output_dir={out}", *with_shards(tiny_shards, shards), *RESUME_CELL]
    line = one_error_line(cli(*argv, *sets(*base)))
    metrics = out / "runs" / "clipit" / "seed-0" / "metrics.json"
    assert f"{metrics}: clipit was evaluated on test under another config (shards_sha256: " in line
    assert "`clipit evaluate --method clipit --split test` with `--overwrite`" in line
    same = cli(*argv, *sets(f"output_dir={out}", *tiny_shards, *RESUME_CELL))  # the split it was evaluated on
    assert same.code == 0 and "clipit seed 0 test: balanced accuracy" in same.stdout, same.stderr[-2000:]


def test_export_rerun_keeps_the_same_export_and_names_another_run(tiny_demo, tmp_path):
    base, _ = tiny_demo
    run0, run1 = base / "runs" / "unimodal" / "seed-0", base / "runs" / "unimodal" / "seed-1"
    out = tmp_path / "export"
    assert cli("export", str(run0), str(out)).code == 0
    model = (out / "model.safetensors").read_bytes()
    again = cli("export", str(run0), str(out))
    assert (
        again.code == 0 and "holds the export of" in again.stdout and (out / "model.safetensors").read_bytes() == model
    )

    line = one_error_line(cli("export", str(run1), str(out)))
    assert f"{out / 'config.json'}: the export in {out} was made under another config (" in line
    assert "seed: 0 then, 1 now" in line and "best_sha256: " in line
    assert "give `clipit export` another OUT_DIR" in line and "with `--overwrite`" in line

    replaced = cli("export", str(run1), str(out), "--overwrite")
    assert replaced.code == 0, replaced.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["identity"]["seed"] == 1


# ---------------------------------------------------------------------------------------------- demo, grid


def test_demo_rerun_reuses_its_cells_and_names_a_changed_key(tiny_demo):
    base, _ = tiny_demo
    results = (base / "results.json").read_text()
    demo = ["demo", "--config", TINY, "--set", f"output_dir={base}"]
    line = one_error_line(cli(*demo, "--set", "methods.clipit.lr=0.5"))
    summary = base / "runs" / "clipit" / "seed-0" / "train_summary.json"
    assert f"{summary}: clipit seed 0 finished under another config (methods.clipit.lr: " in line
    assert "set output_dir to a new folder" in line and "rerun `clipit demo` with `--overwrite`" in line

    same = cli(*demo)  # every cell current: reused in this process, none started
    assert same.code == 0, same.stderr[-2000:]
    assert (
        "4 cells finished under this config: reused" in same.stdout and "[clipit] unimodal seed 0:" not in same.stdout
    )
    assert json.loads((base / "results.json").read_text()) == json.loads(results)


def test_grid_dry_run_marks_cells_of_another_config_changed(tiny_demo, tmp_path):
    base, _ = tiny_demo
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"name: identity\nbase: {ROOT / TINY}\nroot: {base}\nprofile: local-cluster\nseeds: [0]\n"
        "set: {output_dir: '{root}'}\naxes:\n  run:\n    tiny: {methods: [unimodal, clipit]}\n"
    )
    same = cli("grid", "--config", str(grid), "--dry-run")
    assert same.code == 0 and "cells: 2 done" in same.stdout, same.stdout + same.stderr

    changed = cli("grid", "--config", str(grid), "--dry-run", "--set", "methods.clipit.lr=0.5")
    assert changed.code == 0, changed.stderr[-2000:]
    assert "cells: 1 changed, 1 done" in changed.stdout
    row = next(line for line in changed.stdout.splitlines() if line.strip().startswith("clipit"))
    assert "changed" in row and "methods.clipit.lr: 0.001 then, 0.5 now" in row
    assert "not submitted: run=tiny,seed=0 (clipit seed 0 finished under another config: " in changed.stdout
    assert "would submit 0 tasks" in changed.stdout

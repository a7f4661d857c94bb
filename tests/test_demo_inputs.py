"""The demo as an ordinary dataset, corpus and pairing model: `clipit prepare demo` makes its inputs,
then the ordinary readers read them, and `clipit doctor` and the stages run the same checks."""

import json
from pathlib import Path

import pytest

from clipit.data.base import DatasetError
from clipit.data.demo import META_FILE, DemoDataset
from clipit_testing import ROOT, TINY, cli_main

# small enough to prepare in seconds: a 2-step demo CLIP on a 40-image paired set
SMALL = ["data.demo.counts={train: 16, val: 8, test: 8}", "data.demo.n_paired=40", "data.demo.clip_steps=2"]


def sets(out: Path, *extra: str) -> list[str]:
    return [a for s in [f"output_dir={out}", *SMALL, *extra] for a in ("--set", s)]


def doctor(capsys, out: Path, *extra: str) -> tuple[int, list[str]]:
    code = cli_main(["doctor", str(ROOT / TINY), *sets(out, *extra)])
    return code, capsys.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert cli_main(["prepare", "demo", "--config", str(ROOT / TINY), *sets(out)]) == 0
    return out


def test_doctor_on_a_fresh_demo_says_what_prepare_will_make(tmp_path, capsys):
    code, lines = doctor(capsys, tmp_path)
    assert code == 0, lines
    for key, path in [("data", "data/images"), ("reports", "data/reports.jsonl")]:
        assert (
            f"· {key}: {tmp_path / path}: not prepared yet; `clipit prepare demo --config CONFIG` makes it"
            in " ".join(lines)
        )
    assert any(line.startswith("· pairing model demo-clip:") and "not prepared yet" in line for line in lines)
    assert not (tmp_path / "data").exists()  # doctor writes nothing


def test_prepared_demo_is_read_and_checked_like_any_dataset(prepared, capsys):
    code, lines = doctor(capsys, prepared)
    assert code == 0, lines
    assert "✓ dataset: demo: train 16, val 8, test 8; 4 classes" in lines
    assert "✓ corpus: 120 reports" in lines
    assert f"✓ pairing model demo-clip: {prepared / 'demo-clip' / 'model.safetensors'} loads" in lines
    assert "✓ pairing model demo-clip: embedding width 512 = model.text_dim" in lines
    # a second prepare finds everything in place
    assert cli_main(["prepare", "demo", "--config", str(ROOT / TINY), *sets(prepared)]) == 0
    assert capsys.readouterr().out.strip() == "the demo inputs are prepared already"


def test_doctor_and_pair_reject_a_bad_demo_corpus_with_the_same_line(prepared, tmp_path, capsys):
    """Before, doctor passed a demo config whose reports.path was a bad CSV and `clipit pair` rejected it."""
    bad = tmp_path / "reports.csv"
    bad.write_text("report_id,text\nr1,tumour\n")  # no id column
    code, lines = doctor(capsys, prepared, f"reports.path={bad}")
    assert code == 2
    (corpus,) = [line for line in lines if line.startswith("✗ corpus:")]
    pair_code = cli_main(["pair", "--config", str(ROOT / TINY), *sets(prepared, f"reports.path={bad}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert pair_code == 2 and len(err) == 1
    assert corpus == f"✗ corpus: {err[0].removeprefix('clipit: error: ')}"
    assert bad.read_text() == "report_id,text\nr1,tumour\n"  # a user's file is never overwritten by prepare


def test_a_demo_folder_that_disagrees_with_its_record_is_refused(prepared, tmp_path):
    import shutil

    root = tmp_path / "images"
    shutil.copytree(prepared / "data" / "images", root)
    assert DemoDataset(root).split_size("train") == 16
    next((root / "val").rglob("*.png")).unlink()
    with pytest.raises(DatasetError, match=rf"^{root / 'val'}: 7 images but {META_FILE} records 8; delete"):
        DemoDataset(root)
    (root / META_FILE).write_text(json.dumps([1]))
    with pytest.raises(DatasetError, match=rf"^{root / META_FILE}: holds a JSON list, not an object; generate"):
        DemoDataset(root)
    (root / META_FILE).unlink()
    with pytest.raises(DatasetError, match=r"not found; generate the demo data with `clipit prepare demo"):
        DemoDataset(root)


def test_changed_demo_settings_are_named_then_prepared_again_with_overwrite(prepared, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    changed = "data.demo.image_size=32"
    code, lines = doctor(capsys, out, changed)  # doctor fails with the line prepare stops with
    failed = [line for line in lines if line.startswith("✗ data:")]
    assert code == 2 and len(failed) == 1 and "data.demo.image_size: 64 then, 32 now" in failed[0]
    assert cli_main(["prepare", "demo", "--config", str(ROOT / TINY), *sets(out, changed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.demo.image_size: 64 then, 32 now" in err[0] and "--overwrite" in err[0]
    assert err[0].removeprefix("clipit: error: ") in failed[0]
    assert cli_main(["prepare", "demo", "--config", str(ROOT / TINY), "--overwrite", *sets(out, changed)]) == 0
    assert "prepared the demo inputs: data.root" in capsys.readouterr().out
    assert json.loads((out / "data" / "images" / META_FILE).read_text())["size"] == 32


def test_known_third_party_noise_is_dropped(tmp_path):
    """open_clip's "No pretrained weights loaded" (clipit loads the weights itself) is not printed."""
    from clipit_testing import cli

    proc = cli("prepare", "demo", "--config", str(ROOT / TINY), *sets(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo CLIP" in proc.stderr and "No pretrained weights loaded" not in proc.stderr

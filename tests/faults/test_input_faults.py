"""Bad inputs and full disks: one line naming the file and the fix (exit 2, no traceback), nothing a
later stage would accept left behind; `clipit doctor` finds the input problems `clipit pair` would hit,
with the same message."""

import contextlib
import errno
import json
import os
import subprocess
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from clipit_testing import TINY, cli

ENV = {k: v for k, v in os.environ.items() if k != "CLIPIT_WEIGHTS"} | {"CLIPIT_OFFLINE": "1"}
FULL = "no space left on device (free space or "


def one_error(proc) -> str:
    """The contract of a user-fixable fault: exit 2, one stderr line `clipit: error: ...`, no traceback."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("clipit: error: "), proc.stderr
    return lines[0].removeprefix("clipit: error: ")


def folder_dataset(root: Path, per_split: int = 2, classes=("a", "b")) -> Path:
    for split in ("train", "val", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_split // len(classes) or 1):
                Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / split / c / f"{i}.png")
    return root


def pcam_subset(root: Path, n: int = 4) -> Path:
    """The six official PCAM file names, with n patches each (a user's subset)."""
    root.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f["x"] = np.zeros((n, 96, 96, 3), np.uint8)
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f["y"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
    return root


def experiment(tmp_path: Path, reports: Path, data: dict | None = None, **sections) -> Path:
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "data": data or {"name": "folder", "root": str(folder_dataset(tmp_path / "images"))},
        "reports": {"path": str(reports)},
        "methods": {"unimodal": {"method": "unimodal"}},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pair(config, *sets):
    args = ["pair", "--config", str(config)]
    for s in sets:
        args += ["--set", s]
    return cli(*args, env=ENV)


def doctor(config, *sets):
    args = ["doctor", str(config)]
    for s in sets:
        args += ["--set", s]
    proc = cli(*args, env=ENV)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def failed(proc, what: str) -> list[str]:
    """The details of doctor's ✗ lines for `what`."""
    return [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith(f"✗ {what}: ")]


# ------------------------------------------------------------------------------------ corpora and datasets

LATIN1 = "carcinome canalaire infiltrant, r\xe9cepteurs positifs"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "txt", "zip"])
def test_corpus_that_is_not_utf8_is_one_line_naming_file_line_and_fix(tmp_path, fmt):
    text = {
        "csv": f"id,text\nr1,tumour\nr2,{LATIN1}\n",
        "jsonl": json.dumps({"id": "r1", "text": "tumour"})
        + "\n"
        + json.dumps({"id": "r2", "text": LATIN1}, ensure_ascii=False)
        + "\n",
        "txt": f"tumour\n{LATIN1}\n",
    }
    data = text["csv" if fmt == "zip" else fmt].encode("latin-1")
    path = tmp_path / f"reports.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("TCGA_Reports.csv", data)
    else:
        path.write_bytes(data)
    line = one_error(pair(experiment(tmp_path, path)))
    where = f"{path} (TCGA_Reports.csv)" if fmt == "zip" else str(path)
    col = data.splitlines()[-1].index(b"\xe9") + 1
    assert line.startswith(
        f"{where}: line 3 (byte 0xe9 at column {col}) is not utf-8 text; set reports.encoding"
        if fmt != "jsonl" and fmt != "txt"
        else f"{where}: line 2 (byte 0xe9 at column {col}) is not utf-8 text; set reports.encoding"
    ), line
    assert not (tmp_path / "out" / "pairing").exists()


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_declared_encoding_reads_a_latin1_corpus(tmp_path):
    """The fallback is declared, never guessed: reports.encoding."""
    path = tmp_path / "reports.csv"
    path.write_bytes(f"id,text\nr1,tumour\nr2,{LATIN1}\n".encode("latin-1"))
    proc = doctor(experiment(tmp_path, path), "reports.encoding=latin-1")
    assert "✓ corpus: 2 reports" in proc.stdout.splitlines(), proc.stdout


@pytest.mark.parametrize(
    "case", ["corpus field", "dataset sizes", "corpus filter", "top_k", "class names", "split name"]
)
def test_doctor_fails_with_the_message_pair_gives(tmp_path, case):
    """A config doctor passes does not fail at the first step of `clipit pair`: doctor builds the same
    reader, corpus and pairing texts, and a failure is the same message."""
    reports = jsonl(tmp_path / "reports.jsonl", [{"id": "r1", "text": "ductal carcinoma", "organ": "breast"}])
    sets, data, what = [], None, "corpus"
    if case == "corpus field":
        reports = tmp_path / "reports.csv"
        reports.write_text("id,report\nr1,ductal carcinoma\n")
    elif case == "dataset sizes":  # a PCAM subset, checked against the official sizes
        data, what = {"name": "pcam", "root": str(pcam_subset(tmp_path / "pcam"))}, "dataset"
    elif case == "corpus filter":
        sets = ["reports.organ=kidney"]
    elif case == "top_k":
        sets, what = ["pairing.top_k=2"], "pairing texts"
    elif case == "class names":
        sets, what = ["pairing.texts=class_prompts", "pairing.class_names=[benign]"], "pairing texts"
    else:
        sets, what = ["data.expected_sizes={train: 2, valid: 2}"], "dataset"
    config = experiment(tmp_path, reports, data)
    message = one_error(pair(config, *sets))
    proc = doctor(config, *sets)
    assert proc.returncode == 2 and failed(proc, what) == [message], proc.stdout
    assert not (tmp_path / "out" / "pairing").exists()


@pytest.mark.slow  # the default tier keeps its siblings; CI runs this tier too
def test_dataset_size_error_names_the_key_that_declares_a_subset(tmp_path):
    root = pcam_subset(tmp_path / "pcam")
    config = experiment(
        tmp_path, jsonl(tmp_path / "r.jsonl", [{"id": "r1", "text": "x"}]), {"name": "pcam", "root": str(root)}
    )
    line = one_error(pair(config))
    assert "PCAM split 'train' has 4 patches, expected 262,144" in line and "data.expected_sizes" in line
    proc = doctor(config, "data.expected_sizes={train: 4, val: 4, test: 4}")
    assert "✓ dataset: pcam: train 4, val 4, test 4; 2 classes" in proc.stdout.splitlines(), proc.stdout
    proc = doctor(config, "data.expected_sizes={}")  # {}: no size check at all (the class checks stay)
    assert "✓ dataset: pcam: train 4, val 4, test 4; 2 classes" in proc.stdout.splitlines(), proc.stdout


def test_report_text_column_is_a_config_key(tmp_path):
    reports = tmp_path / "reports.csv"
    reports.write_text("key,report\nr1,ductal carcinoma\nr2,lobular carcinoma\n")
    config = experiment(tmp_path, reports)
    line = one_error(pair(config))
    assert line == (
        f"{reports}: row 2 has no text field ('text', 'report_text'); it has ['key', 'report']; set "
        "reports.text_field to the one that holds the report"
    )
    proc = doctor(config, "reports.text_field=report", "reports.id_field=key")
    assert "✓ corpus: 2 reports" in proc.stdout.splitlines() and proc.returncode == 0, proc.stdout + proc.stderr


def test_expected_sizes_also_hold_for_readers_without_official_sizes(tmp_path):
    config = experiment(tmp_path, jsonl(tmp_path / "r.jsonl", [{"id": "r1", "text": "x"}]))
    line = one_error(pair(config, "data.expected_sizes={train: 3}"))
    assert line == (
        f"{tmp_path / 'images'}: split 'train' has 2 images, expected 3 (data.expected_sizes); fix "
        "data.root or data.expected_sizes"
    )
    line = one_error(pair(TINY, f"output_dir={tmp_path / 'demo'}", "data.expected_sizes={valid: 64}"))
    assert line.startswith("data.expected_sizes names split(s) ['valid'], but the dataset's splits are")
    assert not (tmp_path / "demo").exists()  # checked before the demo data is generated


@pytest.mark.parametrize("case", ["bad zip", "no id", "project map"])
def test_unreadable_corpus_files_are_one_line(tmp_path, case):
    path = tmp_path / ("reports.zip" if case == "bad zip" else "reports.csv")
    sets = []
    if case == "bad zip":
        path.write_bytes(b"PK\x03\x04 truncated")
        expected = f"{path}: not a readable zip file"
    elif case == "no id":
        path.write_text("report_id,text\nr1,tumour\n")
        expected = (
            f"{path}: row 2 has no id field ('id', 'patient_filename'); it has ['report_id', 'text']; "
            "add ids or set reports.id_field to the one that holds them"
        )
    else:
        path.write_text("id,text\nTCGA-AA-0001.x,tumour\n")
        pmap = tmp_path / "map.json"
        pmap.write_text("{oops")
        sets = [f"reports.project_map={pmap}", "reports.projects=[BRCA]"]
        expected = f"{pmap}: project map: not valid JSON"
    assert one_error(pair(experiment(tmp_path, path), *sets)).startswith(expected)


# ------------------------------------------------------------------------------------------------ full disk


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "1m"):
    """A small tmpfs at `directory` (root only); skips the test when it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def fill(directory: Path) -> None:
    """Write until the file system is full."""
    with open(directory / "filler", "wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
    with open(directory / "filler", "ab", buffering=0) as fh:  # the last pages
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 512)


def make_run(root: Path, method: str, seed: int, acc: float) -> None:
    run = root / "runs" / method / f"seed-{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"backbone": "b"}, "data": {"name": "d"}, "methods": {method: {"method": method}}})
    )
    (run / "metrics.json").write_text(json.dumps({"method": method, "balanced_accuracy": acc, "accuracy": acc}))


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


def test_full_disk_keeps_the_old_report_and_no_temporaries(tmp_path):
    runs = tmp_path / "runs-root"
    make_run(runs, "unimodal", 0, 0.8)
    with tmpfs(tmp_path / "disk") as disk:
        out = disk / "report"
        assert cli("report", str(runs), "--out", str(out), "--no-plots").returncode == 0
        old = {p.name: p.read_bytes() for p in out.iterdir()}
        make_run(runs, "unimodal", 1, 0.9)  # the new report would differ
        fill(disk)
        line = one_error(cli("report", str(runs), "--out", str(out), "--no-plots"))
        assert line == f"{out / 'table1.csv'}: {FULL}give `clipit report` another --out folder)"
        assert {p.name: p.read_bytes() for p in out.iterdir()} == old and not temporaries(disk)


def test_full_disk_during_a_stage_leaves_nothing_a_rerun_would_accept(tmp_path):
    """The demo images are the first output of `clipit pair`; a full disk leaves no image folder."""
    with tmpfs(tmp_path / "disk") as disk:
        fill(disk)
        line = one_error(cli("pair", "--config", TINY, "--set", f"output_dir={disk / 'out'}"))
        assert line == f"{disk / 'out' / 'data' / 'images'}: {FULL}set output_dir elsewhere)"
        assert not (disk / "out" / "data" / "images").exists() and not temporaries(disk)


def test_read_only_output_is_one_line(tmp_path):
    runs = tmp_path / "runs-root"
    make_run(runs, "unimodal", 0, 0.8)
    with tmpfs(tmp_path / "disk") as disk:
        if subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount the tmpfs read-only")
        line = one_error(cli("report", str(runs), "--out", str(disk / "report"), "--no-plots"))
        assert line == f"{disk / 'report'}: read-only file system (give `clipit report` another --out folder)"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_cli_maps_a_stray_disk_full_oserror_to_one_line(tmp_path, monkeypatch, capsys, code):
    """A writer outside clipit/io.py (a library's own file) that hits a full disk: one line too."""
    from clipit import cli
    from clipit.results import report

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "events.out"))

    monkeypatch.setattr(report, "build_report", full)
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    reason = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
    assert err == [f"clipit: error: {tmp_path / 'events.out'}: {reason} (free space or set output_dir elsewhere)"]


def test_other_oserrors_stay_bugs(tmp_path, monkeypatch):
    from clipit import cli
    from clipit.results import report

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path))

    monkeypatch.setattr(report, "build_report", broken)
    with pytest.raises(OSError) as err:
        cli.main(["report", str(tmp_path)])
    assert err.value.errno == errno.EIO

"""`clipit predict` on inputs and outputs that used to give a silent wrong result or a traceback: link loops,
dangling members, an --out that is a folder, and the temporaries a SIGTERM or kill -9 leaves."""

import csv
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from clipit.io import sweep_stale_temps, temp_prefix
from clipit_testing import ROOT, cli_main


def png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def rows(path):
    with open(path, newline="") as fh:
        return [r["image"] for r in csv.DictReader(fh)]


def one_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_link_loops_under_a_glob_predict_each_file_once(demo_export, tmp_path):
    tiles = tmp_path / "tiles"
    files = [png(tiles / sub / f"{i}.png", i) for i, sub in enumerate(["a", "a", "b", "b"])]
    (tiles / "a" / "loop").symlink_to("..")  # two loops: glob.glob would never finish
    (tiles / "b" / "loop").symlink_to("../a")
    (tiles / "b" / "same.png").symlink_to(files[0])  # one file behind two names: predicted once
    out = tmp_path / "glob.csv"
    assert cli_main(["predict", str(demo_export), str(tiles / "**" / "*.png"), "--out", str(out)]) == 0
    assert rows(out) == sorted(str(p) for p in files)
    assert cli_main(["predict", str(demo_export), str(tiles), "--out", str(tmp_path / "folder.csv")]) == 0
    assert rows(tmp_path / "folder.csv") == sorted(str(p) for p in files)


def test_a_dangling_member_of_a_folder_or_glob_is_named(demo_export, tmp_path, capsys):
    tiles = tmp_path / "tiles"
    png(tiles / "a" / "0.png", 0)
    (tiles / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    for arg in (str(tiles), str(tiles / "**" / "*.png")):
        out = tmp_path / "out.csv"
        assert cli_main(["predict", str(demo_export), arg, "--out", str(out)]) == 2
        assert one_error(capsys).startswith(f"clipit: error: {tiles / 'a' / 'gone.png'}: a link to nothing")
        assert not out.exists()


def test_out_naming_a_folder_is_refused_before_any_work(demo_export, tmp_path, capsys):
    png(tmp_path / "x.png", 0)
    folder = tmp_path / "results"
    folder.mkdir()
    for flag in ("--out", "--features"):
        assert cli_main(["predict", str(demo_export), str(tmp_path / "x.png"), flag, str(folder)]) == 2
        assert one_error(capsys) == (
            f"clipit: error: {flag} {folder}: is a folder; name a file (e.g. {folder / 'predictions.csv'})"
        )
    assert list(folder.iterdir()) == []


def test_stale_temporaries_of_a_dead_writer_are_swept_a_live_ones_kept(tmp_path):
    out = tmp_path / "pred.csv"
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        live = tmp_path / f"{temp_prefix(out.name).replace(str(os.getpid()), str(sleeper.pid))}abc.tmp"
        live.write_text("a live writer's")
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = tmp_path / f"{temp_prefix(out.name).replace(str(os.getpid()), str(dead.pid))}xyz.rows"
        stale.write_text("a killed writer's")
        other_host = tmp_path / f".{out.name}.not-{socket.gethostname()}-{dead.pid}.q.tmp"
        other_host.write_text("another node's")
        assert sweep_stale_temps(out) == [stale]
        assert live.exists() and other_host.exists() and not stale.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sigterm_leaves_no_temporaries(demo_export, tmp_path):
    """SIGTERM (SLURM preemption) while predict writes: the process ends through Python and removes its
    .tmp and .rows files. Frozen with SIGSTOP once its outputs are open, so nothing races."""
    images = [png(tmp_path / "in" / f"{i}.png", i) for i in range(400)]
    out, feats = tmp_path / "o" / "pred.csv", tmp_path / "o" / "f.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipit", "predict", str(demo_export), str(images[0].parent), "--out", str(out),
         "--features", str(feats), "--batch-size", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out.parent.exists() and len(list(out.parent.glob(".*"))) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGSTOP)
    assert {p.suffix for p in out.parent.glob(".*")} == {".tmp", ".rows"}
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert list(out.parent.iterdir()) == []


def test_a_rotated_jpeg_is_predicted_upright(demo_export, tmp_path):
    from PIL import Image as PILImage

    pixels = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    exif = PILImage.Exif()
    exif[0x0112] = 6  # stored 96 x 64, seen 64 x 96
    PILImage.fromarray(pixels).save(tmp_path / "rotated.jpg", quality=100, exif=exif)
    out = tmp_path / "p.csv"
    assert cli_main(["predict", str(demo_export), str(tmp_path / "rotated.jpg"), "--out", str(out)]) == 0
    with open(out, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["width"], row["height"]) == ("64", "96")


def test_a_reader_that_leaves_ends_predict_quietly(demo_export, tmp_path):
    """`clipit predict ... | head -1`: the table outgrows the pipe (64 KiB), so the writer is blocked on it
    when the reader closes; its next write meets EPIPE, and the process ends quietly (128 + SIGPIPE)."""
    folder = tmp_path / "tiles"
    rng = np.random.default_rng(0)
    for i in range(1200):
        path = folder / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipit", "predict", str(demo_export), str(folder)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout.readline().startswith(b"image\tprediction")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]

"""Faults in shard sets, end to end: real shards of the tiny demo (copied from the session's build), real
corruption, the real `clipit` CLI in its own process (or the real function). The contract: exit 2, one
`clipit: error:` line naming the file and the fix, no traceback, and nothing left that a later stage
would accept; following the line's advice repairs the set (byte-identical to the original)."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import clipit.shards.validate as validation
from clipit.cli import main
from clipit.locks import LOCK_FILE
from clipit.shards.codec import encode_embedding
from clipit.shards.manifest import LOCKS, MANIFEST, VERIFIED, ShardError, load_manifest
from clipit.shards.validate import verify_shard_set
from clipit_testing import ROOT, TINY, cli, written_key

REBUILD = "delete this shard and rerun `clipit shard build --config <config>`"


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture()
def copy(tiny_shards, tmp_path):
    """A private copy of the session's tiny shard set; returns (shard dir, overrides that build into it)."""
    source = Path(tiny_shards[0].split("=", 1)[1])
    out = tmp_path / "shards"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(LOCK_FILE, LOCKS, VERIFIED))
    return out, [f"shards.dir={out}", *tiny_shards[1:]]


@pytest.fixture(scope="module")
def tiny_png(tiny_shards, tmp_path_factory) -> list[str]:
    """The tiny demo's set stored as png (the session's is raw: the demo has one image size); only the
    shards are built again (the pairing is the session's)."""
    overrides = [f"shards.dir={tmp_path_factory.mktemp('png') / 'shards'}", *tiny_shards[1:], "shards.codec=png"]
    proc = build(overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return overrides


@pytest.fixture()
def copy_png(tiny_png, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(original(tiny_png), out, ignore=shutil.ignore_patterns(LOCK_FILE, LOCKS, VERIFIED))
    return out, [f"shards.dir={out}", *tiny_png[1:]]


def original(tiny_shards) -> Path:
    return Path(tiny_shards[0].split("=", 1)[1])


def sets(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def build(overrides, *extra, **kwargs):
    return cli("shard", "build", "--config", TINY, *sets(overrides), *extra, **kwargs)


def refused(proc, *fragments) -> str:
    """The contract: exit 2, exactly one `clipit: error:` line (with `fragments`), no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.startswith("clipit: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def validate(capsys):
    """`clipit shard validate` through the CLI's main (in this process: one interpreter start, not 40)."""

    def run(shard_dir, *flags) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(["shard", "validate", str(shard_dir), *flags])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["clipit", "shard", "validate"], code, captured.out, captured.err)

    return run


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_members(path: Path, items: list[tuple[str, bytes]]) -> None:
    """A valid tar of exactly these members (in this order)."""
    path.unlink(missing_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))


def edit(path: Path, name: str, data: bytes | None) -> None:
    """Replace member `name` (`None`: remove it)."""
    items = members(path)
    assert name in [n for n, _ in items], name
    write_members(path, [(n, data if n == name else d) for n, d in items if not (n == name and data is None)])


def rehash(shard_dir: Path) -> None:
    """What someone who 'fixes' a checksum error by hand does: the manifest takes the bytes on disk."""
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            shard["sha256"] = hashlib.sha256((shard_dir / shard["path"]).read_bytes()).hexdigest()
    (shard_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))


def digests(shard_dir: Path) -> dict[str, str]:
    files = sorted(shard_dir.rglob("*.tar")) + [shard_dir / MANIFEST]
    return {
        p.relative_to(shard_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.exists()
    }


def stray(shard_dir: Path) -> list[Path]:
    """Temporary files: what a killed or racing writer could leave (lock files are not output)."""
    return [
        p
        for p in shard_dir.rglob("*")
        if p.name.startswith(".")
        and p.name not in (LOCK_FILE, VERIFIED)
        and LOCKS not in p.relative_to(shard_dir).parts
    ]


SHARD = "train/train-000001.tar"
RAW = "img.u8"  # the raw codec's field (the tiny demo's set is raw)
KEY = written_key("train", 70)  # a sample of that shard (64 per shard; the train split is written shuffled)


# ------------------------------------------------------------------------ `clipit shard validate`


def test_intact_set_passes_deep_and_quick(copy, validate):
    out, _ = copy
    for flags in ((), ("--quick",)):
        proc = validate(out, *flags)
        assert proc.returncode == 0 and proc.stdout.startswith("ok: ") and "train 256" in proc.stdout, proc.stderr
    assert "quick" in validate(out, "--quick").stdout


@pytest.mark.parametrize("flags", [(), ("--quick",)])
def test_garbage_bytes_fail_the_checksum_in_both_modes(copy, flags, validate):
    out, _ = copy
    path = out / SHARD
    data = bytearray(path.read_bytes())
    data[5000:5016] = b"\xde\xad\xbe\xef" * 4
    path.write_bytes(bytes(data))
    refused(validate(out, *flags), f"{path}: checksum differs from the manifest", REBUILD)


def test_missing_shard_names_the_rebuild(copy):
    out, _ = copy
    (out / SHARD).unlink()
    refused(
        cli("shard", "validate", str(out)),
        f"{out / SHARD}: listed in the manifest but missing",
        "rerun `clipit shard build --config <config>`",
    )


def test_undecodable_image_behind_a_rehashed_manifest(copy_png, validate):
    out, _ = copy_png
    png = dict(members(out / SHARD))[f"{KEY}.png"]
    edit(out / SHARD, f"{KEY}.png", png[:40] + b"\x00" * (len(png) - 40))  # header intact, pixel data zeroed
    rehash(out)
    refused(validate(out), f"{out / SHARD}: sample {KEY}: its png image does not decode", REBUILD)
    assert validate(out, "--quick").returncode == 0  # quick mode trusts the (re-hashed) checksums: its documented cost


def test_image_field_holding_another_type(copy_png, validate):
    out, _ = copy_png
    edit(out / SHARD, f"{KEY}.png", json.dumps({"not": "an image"}).encode())
    rehash(out)
    refused(validate(out), f"sample {KEY}: its png image does not decode (not an image")


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (lambda raw, png: raw[:-100], "12,188 bytes where 64x64x3 uint8 needs 12,288 (truncated or garbled)"),
        (lambda raw, png: raw + b"\x00" * 7, "12,295 bytes where 64x64x3"),
        (lambda raw, png: png, "bytes where 64x64x3 uint8 needs 12,288"),  # an encoded image under the raw field
        (lambda raw, png: b"", "0 bytes where 64x64x3"),
    ],
    ids=["truncated", "padded", "png-bytes", "empty"],
)
def test_raw_payload_of_the_wrong_size(copy, tiny_png, payload, fragment, validate):
    out, _ = copy
    raw = dict(members(out / SHARD))[f"{KEY}.{RAW}"]
    png = dict(members(original(tiny_png) / SHARD))[f"{KEY}.png"]
    edit(out / SHARD, f"{KEY}.{RAW}", payload(raw, png))
    rehash(out)
    refused(validate(out), f"{out / SHARD}: sample {KEY}: its {RAW} image does not decode (", fragment, REBUILD)


def test_raw_shape_in_the_json_differs_from_the_manifest(copy, validate):
    out, _ = copy
    meta = json.loads(dict(members(out / SHARD))[f"{KEY}.json"])
    assert meta["image_shape"] == [64, 64, 3] == load_manifest(out)["image"]["shape"]
    meta["image_shape"] = [32, 128, 3]  # the same number of bytes, another shape
    edit(out / SHARD, f"{KEY}.json", json.dumps(meta).encode())
    rehash(out)
    refused(
        validate(out), f"sample {KEY}: json image_shape [32, 128, 3] where the manifest's raw codec has [64, 64, 3]"
    )


def test_codec_mismatch_between_a_sample_and_the_manifest(copy, tiny_png, validate):
    out, _ = copy
    png = dict(members(original(tiny_png) / SHARD))[f"{KEY}.png"]
    items = [(f"{KEY}.png", png) if n == f"{KEY}.{RAW}" else (n, d) for n, d in members(out / SHARD)]
    write_members(out / SHARD, items)  # one sample stored as png in a raw set (in the raw field's place)
    rehash(out)
    refused(validate(out), f"sample {KEY}: its image is stored as png, but the manifest's image codec is raw", REBUILD)


@pytest.mark.parametrize(
    "image, fragment",
    [
        ({"codec": "png"}, "_00000000: its image is stored as img.u8, but the manifest's image codec is png"),
        ({"codec": "jpeg"}, "manifest.json: image {'codec': 'jpeg'} is neither"),
        (
            {"codec": "raw", "shape": [64, 64], "dtype": "uint8"},
            "manifest.json: image {'codec': 'raw', 'shape': [64, 64]",
        ),
    ],
    ids=["other-codec", "unknown-codec", "bad-shape"],
)
def test_manifest_with_another_codec_than_its_shards(copy, image, fragment, validate):
    out, _ = copy
    manifest = load_manifest(out)
    manifest["image"] = image
    (out / MANIFEST).write_text(json.dumps(manifest))
    refused(validate(out), fragment)
    if image["codec"] != "png":  # a malformed codec is the manifest's own fault: quick mode sees it too
        refused(validate(out, "--quick"), fragment, "rerun `clipit shard build --config <config>`")


def test_loader_refuses_a_truncated_raw_payload(copy):
    from clipit.shards.manifest import split_urls
    from clipit.training.loader import eval_loader

    out, _ = copy
    raw = dict(members(out / SHARD))[f"{KEY}.{RAW}"]
    edit(out / SHARD, f"{KEY}.{RAW}", raw[:1000])
    with pytest.raises(ShardError) as err:
        list(eval_loader(split_urls(out, "train"), batch_size=64))
    assert str(err.value).startswith(f"{out / SHARD}: sample {KEY}: its {RAW} image does not decode (1,000 bytes")
    assert REBUILD in str(err.value) and "\n" not in str(err.value)


def test_a_rebuild_with_another_codec_is_refused(copy):
    out, overrides = copy
    refused(
        build([*overrides, "shards.codec=png"]),
        f"{out / MANIFEST}: the shards in {out} were built under another config (",
        "shards.codec.codec: 'raw' then, 'png' now",
        "set shards.codec: raw",
    )


def test_tar_cut_at_a_member_boundary(copy, validate):
    """Plain tarfile stops quietly at a missing header: the shard would read as a shorter one."""
    out, _ = copy
    path = out / SHARD
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[40].offset  # the header of member 40
    path.write_bytes(path.read_bytes()[:cut])
    rehash(out)
    refused(validate(out), f"{path}: not a whole tar at sample", "truncated or corrupt", REBUILD)


def test_tar_cut_inside_a_member(copy, validate):
    out, _ = copy
    path = out / SHARD
    with tarfile.open(path) as tar:
        member = tar.getmembers()[41]
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])
    rehash(out)
    refused(validate(out), f"{path}: not a whole tar at sample", "unexpected end of data")


def test_garbled_header_between_members(copy, validate):
    out, _ = copy
    path = out / SHARD
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[20].offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 512] = b"\x37" * 512
    path.write_bytes(bytes(data))
    rehash(out)
    refused(validate(out), f"{path}: not a whole tar at sample")


def test_zero_byte_shard(copy, validate):
    out, _ = copy
    (out / SHARD).write_bytes(b"")
    rehash(out)
    refused(validate(out), f"{out / SHARD}: not a whole tar before its first sample")


def test_duplicate_key_across_shards(copy, validate):
    out, _ = copy
    first = [(n, d) for n, d in members(out / "train/train-000000.tar") if n.startswith(written_key("train", 3) + ".")]
    items = members(out / SHARD)
    write_members(out / SHARD, first + items[4:])  # the first sample of shard 1 replaced by a copy of sample 3
    rehash(out)
    refused(validate(out), f"{out / SHARD}: sample {written_key('train', 3)}: key appears twice in the set", REBUILD)


def test_extra_sample_in_a_shard(copy, validate):
    out, _ = copy
    items = members(out / SHARD)
    last = written_key("train", 127)
    write_members(out / SHARD, items + [(n.replace(last, "train_00000999"), d) for n, d in items[-4:]])
    rehash(out)
    refused(validate(out), f"{out / SHARD}: more samples than the 64 this shard holds")


def test_sample_without_its_embedding(copy, validate):
    """Used to crash validation with a KeyError traceback."""
    out, _ = copy
    edit(out / SHARD, f"{KEY}.emb.npy", None)
    rehash(out)
    refused(validate(out), f"sample {KEY}: no emb.npy", REBUILD)


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (lambda d: encode_embedding(np.ones(8)), "emb.npy is float16 (8,), the manifest says float16 ({d},)"),
        (lambda d: encode_embedding(np.full(d, np.nan)), "emb.npy holds NaN or inf"),
        (lambda d: npy(np.ones(d, np.float32)), "emb.npy is float32 ({d},)"),
        (lambda d: npy(np.ones((8, 8), np.float16)), "emb.npy is float16 (8, 8)"),
        (lambda d: b"\x93NUMPY garbage that is no header", "emb.npy is no .npy array"),
    ],
    ids=["wrong-shape", "nan", "wrong-dtype", "2-d", "not-npy"],
)
def test_bad_embedding(copy, payload, fragment, validate):
    out, _ = copy
    dim = load_manifest(out)["embedding"]["dim"]
    edit(out / SHARD, f"{KEY}.emb.npy", payload(dim))
    fragment = fragment.format(d=dim)
    rehash(out)
    refused(validate(out), f"sample {KEY}: {fragment}")


@pytest.mark.parametrize(
    "cls, fragment",
    [
        (b"7", "label 7 outside the manifest's 4 classes"),
        (b"-1", "label -1 outside"),
        (b"tumor", "cls is not an integer"),
    ],
)
def test_bad_label(copy, cls, fragment, validate):
    out, _ = copy
    edit(out / SHARD, f"{KEY}.cls", cls)
    rehash(out)
    refused(validate(out), f"sample {KEY}: {fragment}")


def test_json_that_does_not_parse(copy, validate):
    out, _ = copy
    edit(out / SHARD, f"{KEY}.json", b'{"report_index": 3,')
    rehash(out)
    refused(validate(out), f"sample {KEY}: json does not parse")


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("report_index", 10_000, "report_index 10000 is not a text of this set"),
        ("report_index", "3", "report_index '3' is not a text"),
        ("split", "test", "split 'test' in a shard of 'train'"),
        ("score", float("nan"), "score nan is not a finite number"),
        ("rank", 2, "rank 2 where the manifest's selection gives 1"),
        ("topk_report_indices", [1, -4], "topk_report_indices"),
    ],
)
def test_json_fields_that_are_not_sane(copy, field, value, fragment, validate):
    out, _ = copy
    meta = json.loads(dict(members(out / SHARD))[f"{KEY}.json"])
    meta[field] = value
    edit(out / SHARD, f"{KEY}.json", json.dumps(meta).encode())
    rehash(out)
    refused(validate(out), f"sample {KEY}: json {fragment}")


@pytest.mark.parametrize(
    "manifest, fragment",
    [
        (b"{not json", "unreadable"),
        (b"[1, 2]", "not a manifest (a JSON list)"),
        (None, "split train counts 999 samples, counts says 256"),
    ],
    ids=["not-json", "wrong-type", "inconsistent-counts"],
)
def test_bad_manifest(copy, manifest, fragment, validate):
    out, _ = copy
    path = out / MANIFEST
    if manifest is None:
        data = json.loads(path.read_text())
        data["splits"]["train"]["count"] = 999
        manifest = json.dumps(data).encode()
    path.write_bytes(manifest)
    for flags in ((), ("--quick",)):
        refused(validate(out, *flags), f"{path}: {fragment}", "rerun `clipit shard build --config <config>`")


# ------------------------------------------------------------------ `clipit shard build` reruns


def test_following_the_checksum_advice_rebuilds_exactly_that_shard(copy, tiny_shards, validate):
    """Delete the shard the error names, rerun `clipit shard build`: that shard (byte-identical) and the
    manifest are written again, nothing else is touched."""
    out, overrides = copy
    want = digests(original(tiny_shards))
    path = out / SHARD
    data = bytearray(path.read_bytes())
    data[-3000:-2990] = b"x" * 10
    path.write_bytes(bytes(data))
    refused(validate(out), f"{path}: checksum differs", REBUILD)
    others = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar") if p != path}
    path.unlink()
    proc = build(overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digests(out) == want
    assert {p: p.stat().st_mtime_ns for p in others} == others  # only the deleted shard was written
    assert validate(out).returncode == 0 and not stray(out)


def test_a_part_rerun_rebuilds_its_deleted_shard(copy, tiny_shards, validate):
    out, overrides = copy
    want = digests(original(tiny_shards))
    (out / "val/val-000000.tar").unlink()  # unit 4 of 7 (train 0-3, val 0, test 0-1): part 0 of 2 owns it
    proc = build(overrides, "--part", "0", "--num-parts", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digests(out) == want and validate(out).returncode == 0


@pytest.mark.parametrize("codec", ["png", "raw"])
def test_deleted_manifest_does_not_rebless_a_corrupt_shard(codec, request):
    out, overrides = request.getfixturevalue("copy_png" if codec == "png" else "copy")
    want = digests(out)  # the copy's: the original's bytes
    field = "png" if codec == "png" else RAW
    image = dict(members(out / SHARD))[f"{KEY}.{field}"]
    broken = image[:40] + b"\x00" * (len(image) - 40) if codec == "png" else image[:-64]  # still a tar
    edit(out / SHARD, f"{KEY}.{field}", broken)
    (out / MANIFEST).unlink()
    refused(build(overrides), f"{out / SHARD}: sample {KEY}: its {field} image does not decode", REBUILD)
    assert not (out / MANIFEST).exists()  # nothing a trainer would accept
    (out / SHARD).unlink()  # the advice
    proc = build(overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digests(out) == want


def test_deleted_manifest_refuses_a_decodable_shard_of_other_content(copy):
    """Well-formed, finite, decodable, yet not what the pairs give: compared byte for byte, not blessed."""
    out, overrides = copy
    edit(out / SHARD, f"{KEY}.emb.npy", encode_embedding(np.full(load_manifest(out)["embedding"]["dim"], 0.125)))
    (out / MANIFEST).unlink()
    refused(
        build(overrides),
        f"{out / SHARD}: sample {KEY}: its emb.npy differs from what the pairs and texts give",
        REBUILD,
    )
    assert not (out / MANIFEST).exists()


def test_deleted_manifest_is_written_again_from_intact_shards(copy, tiny_shards):
    out, overrides = copy
    (out / MANIFEST).unlink()
    proc = build(overrides, "--finalize")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digests(out) == digests(original(tiny_shards))


# ------------------------------------------------------------------------- verify_shard_set


def test_verify_shard_set_hashes_once_and_sees_changes(copy, monkeypatch):
    out, _ = copy
    tars = sorted(out.rglob("*.tar"))
    for path in tars:  # a known, old mtime: any later write changes it
        os.utime(path, ns=(10**18, 10**18))
    hashed = []
    real = validation.sha256_file
    monkeypatch.setattr(validation, "sha256_file", lambda p, *a: hashed.append(Path(p)) or real(p, *a))
    manifest = load_manifest(out)
    verify_shard_set(out, manifest)
    assert sorted(hashed) == tars and (out / VERIFIED).exists()
    hashed.clear()
    verify_shard_set(out, manifest)
    assert hashed == []  # unchanged tars: not hashed again
    path = out / SHARD
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF  # same size, written in place
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError) as err:
        verify_shard_set(out, manifest)
    assert hashed == [path] and str(err.value).startswith(f"{path}: checksum differs from the manifest")
    assert REBUILD in str(err.value) and "\n" not in str(err.value)


def test_verify_shard_set_refuses_a_missing_shard_and_a_broken_manifest(copy):
    out, _ = copy
    manifest = load_manifest(out)
    (out / SHARD).unlink()
    with pytest.raises(ShardError, match="listed in the manifest but missing; rerun `clipit shard build"):
        verify_shard_set(out, manifest)
    manifest["splits"]["val"]["shards"][0]["count"] = 63
    with pytest.raises(ShardError, match="val/val-000000.tar counts 63 samples, expected 64"):
        verify_shard_set(out, manifest)


# --------------------------------------------------------------------------- one writer per directory

HOLD = textwrap.dedent("""
    import sys, time
    from clipit.locks import exclusive
    with exclusive(sys.argv[1], "shard directory"):
        print("locked", flush=True)
        time.sleep(600)
""")


@pytest.fixture()
def holder():
    """Hold a directory's lock from another process (what a running full build does)."""
    procs = []

    def hold(directory: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_full_build_is_refused(tmp_path, tiny_shards, holder):
    out = tmp_path / "shards"
    proc = holder(out)
    refused(
        build([f"shards.dir={out}", *tiny_shards[1:]]),
        f"{out}: this shard directory is being written by pid {proc.pid}",
    )
    assert not list(out.rglob("*.tar")) and not (out / MANIFEST).exists() and not stray(out)


def test_parts_write_shards_while_the_directory_is_held(tmp_path, tiny_shards, holder):
    """A part needs the directory only for build.json and the manifest, so it never waits for another
    part's (or a full build's) hold while it writes its shards."""
    out = tmp_path / "shards"
    overrides = [f"shards.dir={out}", *tiny_shards[1:]]
    first = build(overrides, "--part", "0", "--num-parts", "3")
    assert first.returncode == 0 and "still missing" in first.stdout, first.stderr[-3000:]
    holder(out)
    second = build(overrides, "--part", "1", "--num-parts", "3")
    assert second.returncode == 0 and "still missing" in second.stdout, second.stderr[-3000:]
    assert len(list(out.rglob("*.tar"))) == 5 and not (out / MANIFEST).exists()  # parts 0 and 1: units 0,1,3,4,6


def test_concurrent_parts_and_a_duplicate_part_make_one_identical_set(tmp_path, tiny_shards, validate):
    """Three parts of an array and a second copy of part 1 (a requeued task) at once: every process ends
    well, the set is byte-identical to a one-process build, exactly one manifest, no temporary file."""
    out = tmp_path / "shards"
    cmd = [
        sys.executable,
        "-m",
        "clipit",
        "shard",
        "build",
        "--config",
        TINY,
        *sets([f"shards.dir={out}", *tiny_shards[1:]]),
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--part", str(p), "--num-parts", "3"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in (0, 1, 2, 1)
    ]
    results = [(*proc.communicate(timeout=600), proc.returncode) for proc in procs]
    for _, stderr, code in results:
        assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert sum(str(out / MANIFEST) in stdout for stdout, _, _ in results) >= 1
    assert digests(out) == digests(original(tiny_shards))
    assert not stray(out) and validate(out).returncode == 0

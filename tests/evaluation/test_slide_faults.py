"""Damaged slides in `clipit predict`: one line naming the slide, exit 2, no traceback; never a thumbnail
read that needs gigabytes."""

import struct

import pytest

from clipit.evaluation.slide import MAX_THUMBNAIL_SOURCE_PX
from clipit_testing import cli_main


def tiled_tiff(path, width: int, height: int, tile: int = 256):
    """A real tiled, uncompressed RGB TIFF header claiming width x height px, every tile pointing at one
    shared block of glass: openslide opens it as a one-level slide without gigabytes on disk."""
    n = -(-width // tile) * -(-height // tile)
    block = b"\xf0" * (tile * tile * 3)
    entries = [  # (tag, type, count, value or data) with type 3 = SHORT, 4 = LONG
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, struct.pack("<3H", 8, 8, 8)),
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (277, 3, 1, 3),
        (284, 3, 1, 1),
        (322, 4, 1, tile),
        (323, 4, 1, tile),
        (324, 4, n, None),  # offsets, filled below
        (325, 4, n, struct.pack(f"<{n}I", *([len(block)] * n))),
    ]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(entries) + 4
    blobs, ifd = [], b""
    block_at = data_at + 6 + 4 * n + 4 * n  # after the bits, the offsets and the counts
    offsets = struct.pack(f"<{n}I", *([block_at] * n))
    for tag, kind, count, value in entries:
        payload = offsets if tag == 324 else value
        if isinstance(payload, bytes):
            ifd += struct.pack("<HHII", tag, kind, count, data_at + sum(len(b) for b in blobs))
            blobs.append(payload)
        else:
            ifd += struct.pack("<HHI", tag, kind, count) + struct.pack("<I" if kind == 4 else "<HH", *(
                (payload,) if kind == 4 else (payload, 0)))  # fmt: skip
    path.write_bytes(
        b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", len(entries)) + ifd + b"\0\0\0\0"
        + b"".join(blobs) + block
    )  # fmt: skip
    return path


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_header_claiming_200000_squared_pixels_is_refused_before_any_read(demo_export, tmp_path, capsys):
    pytest.importorskip("openslide")
    slide = tiled_tiff(tmp_path / "huge.tif", 200_000, 200_000)
    assert 200_000**2 > MAX_THUMBNAIL_SOURCE_PX
    code = cli_main(["predict", str(demo_export), str(slide), "--out", str(tmp_path / "p.csv"), "--mpp", "0.5"])
    assert code == 2
    line = one_error(capsys)
    assert line.startswith(f"clipit: error: {slide}: its coarsest usable level is 200000x200000 px, too large")
    assert not (tmp_path / "p.csv").exists()


def test_a_small_tiled_tiff_of_the_same_make_is_predicted(demo_export, tmp_path):
    """The generator above writes slides openslide reads: the refusal is about the size alone."""
    pytest.importorskip("openslide")
    slide = tiled_tiff(tmp_path / "small.tif", 2048, 1024)
    assert cli_main(["predict", str(demo_export), str(slide), "--out", str(tmp_path / "p.csv"), "--mpp", "0.5",
                 "--min-tissue", "0"]) == 0  # fmt: skip
    assert len((tmp_path / "p.csv").read_text().splitlines()) > 1


@pytest.mark.parametrize("keep", [0.3, 0.7, 0.95])
def test_a_truncated_slide_is_one_line_naming_it(demo_export, cmu1_slide, tmp_path, capsys, keep):
    data = cmu1_slide.read_bytes()
    slide = tmp_path / "cut.svs"
    slide.write_bytes(data[: int(len(data) * keep)])
    code = cli_main(["predict", str(demo_export), str(slide), "--out", str(tmp_path / "p.csv"), "--min-tissue", "0"])
    assert code == 2
    assert one_error(capsys).startswith(f"clipit: error: {slide}: openslide cannot read")
    assert not (tmp_path / "p.csv").exists() and not list(tmp_path.glob(".*"))

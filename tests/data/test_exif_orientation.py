"""EXIF orientation: a rotated JPEG is read upright by every stage (readers, shard build, predict), as
PIL's ImageOps.exif_transpose shows it, instead of as its stored pixels."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from clipit.data.base import decode_image, upright_size
from clipit.data.folder import ImageFolderDataset


def rotated_jpeg(orientation: int) -> bytes:
    """A 96 x 64 (w x h) JPEG whose EXIF says how it is to be seen."""
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:8, :] = 255  # a white band along the top as stored: where it ends up shows the turn
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=100, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_reads_as_exif_transpose_shows_it(orientation):
    data = rotated_jpeg(orientation)
    with Image.open(io.BytesIO(data)) as img:
        want = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        assert upright_size(img) == (want.shape[1], want.shape[0])
    got = np.asarray(decode_image(data))
    np.testing.assert_array_equal(got, want)
    assert got.shape[:2] == ((96, 64) if orientation >= 5 else (64, 96))


def test_a_folder_dataset_reads_a_rotated_tile_upright(tmp_path):
    for split in ("train", "val", "test"):
        (tmp_path / split / "tumor").mkdir(parents=True)
        (tmp_path / split / "tumor" / "tile.jpg").write_bytes(rotated_jpeg(6))
    dataset = ImageFolderDataset(tmp_path)
    image = np.asarray(decode_image(dataset.sample("train", 0).data))
    assert image.shape == (96, 64, 3)  # 64 wide, 96 high, as a viewer shows it
    assert image[:, -8:].mean() > 200 and image[:, :8].mean() < 50  # the stored top band is now on the right

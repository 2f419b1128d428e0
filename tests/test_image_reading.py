"""Image files as the scripts read them (`minigen.image.read_image`, `read_mask`, `read_square`).

References: diffusers' `load_image` (EXIF orientation applied, then RGB) for photos, transformers'
`convert_to_rgb` (transparency composited onto white) for images with alpha, and the file's own values for
16-bit images (v / 65535 of full scale, so v / 257 in 8 bits). Exact equality where stated.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from minigen.image import read_image, read_mask, read_square


def photo(tmp_path, orientation: int):
    """A 64x48 (WxH) JPEG whose EXIF says to turn it (6: 90 degrees clockwise), a red block top left."""
    pixels = np.full((48, 64, 3), 40, np.uint8)
    pixels[:8, :16] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{orientation}.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def test_photos_are_read_upright_as_diffusers_reads_them(tmp_path):
    """A phone photo stores its pixels sideways and an EXIF orientation; read without it, `--image` was
    drawn sideways (64x48 instead of 48x64) and a mask painted on the upright photo no longer lined up."""
    from diffusers.utils import load_image

    path = photo(tmp_path, 6)
    image = read_image(path)
    assert image.size == (48, 64)
    assert np.array_equal(np.asarray(image), np.asarray(load_image(str(path))))
    assert np.asarray(image)[:16, -8:, 0].mean() > 200  # the red block, turned to the top right
    assert read_mask(path).size == (48, 64)
    assert read_image(photo(tmp_path, 1)).size == (64, 48)  # orientation 1: as stored


def test_sixteen_bit_images_and_masks_keep_their_levels(tmp_path):
    """A 16-bit grey PNG (Pillow's "I;16") was clipped at 255 of 65535 by convert("RGB"): a gradient read
    almost all white, a near-black mask marked everything for redrawing."""
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    image = np.asarray(read_image(tmp_path / "g16.png"))
    assert np.array_equal(image[..., 0], np.round(values / 257).astype(np.uint8)) and np.array_equal(image[..., 0], image[..., 2])
    assert abs(image.mean() - 127.5) < 0.5
    assert abs((np.asarray(read_mask(tmp_path / "g16.png")) == 255).mean() - 0.5) < 0.01  # 128 or more of 255 redrawn
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(tmp_path / "dark.png")
    assert (np.asarray(read_mask(tmp_path / "dark.png")) == 0).all()  # 300 / 65535: black, kept
    layered = np.full((8, 8), 32896, np.uint16)
    layered[:4] = 1000  # painted; the rest is the PNG's transparent grey level (it was read as grey)
    Image.fromarray(layered).save(tmp_path / "layer16.png", transparency=32896)
    assert tuple(np.asarray(read_image(tmp_path / "layer16.png"))[6, 0]) == (255, 255, 255)
    assert np.asarray(read_mask(tmp_path / "layer16.png"))[:, 0].tolist() == [255] * 4 + [0] * 4  # the painted part redrawn


def test_images_whose_range_no_file_states_are_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"--image .*f.tiff: a floating-point image, whose range .* save it as an 8-bit or 16-bit PNG"):
        read_image(tmp_path / "f.tiff", "--image")
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "i.tiff")
    with pytest.raises(ValueError, match=r"a 32-bit integer image"):
        read_mask(tmp_path / "i.tiff")


def test_transparent_parts_are_white(tmp_path):
    """A cut-out subject (RGBA, red hidden under the transparent part) reads as transformers' image
    processors read it: composited onto white (the RGB under it was kept, red here)."""
    from transformers.image_transforms import convert_to_rgb

    pixels = np.zeros((32, 32, 4), np.uint8)
    pixels[..., 0] = 255  # red everywhere, hidden where alpha is 0
    pixels[8:24, 8:24] = (20, 200, 40, 255)
    pixels[:4, :4, 3] = 128  # half transparent
    Image.fromarray(pixels, "RGBA").save(tmp_path / "cut.png")
    image = read_image(tmp_path / "cut.png")
    with Image.open(tmp_path / "cut.png") as original:
        expected = convert_to_rgb(original, return_numpy=True)
    assert np.array_equal(np.asarray(image), expected)
    assert tuple(np.asarray(image)[30, 30]) == (255, 255, 255) and tuple(np.asarray(image)[16, 16]) == (20, 200, 40)


def test_missing_and_damaged_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--image .*nothing.png does not exist$"):
        read_image(tmp_path / "nothing.png", "--image")
    with pytest.raises(FileNotFoundError, match=r"does not exist \(it is a folder\)"):
        read_mask(tmp_path, "--mask")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"--mask .*broken.png: cannot be read as an image \(UnidentifiedImageError"):
        read_mask(tmp_path / "broken.png", "--mask")


def test_read_square_crops_the_centre(tmp_path):
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 20:60] = 255  # the centred 40x40 square is white, the sides black
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    square = read_square(tmp_path / "wide.png", 16)
    assert square.shape == (3, 16, 16) and torch.equal(square, torch.ones(3, 16, 16))


def test_next_free_path_counts_on_from_the_highest_number(tmp_path):
    """With only minigen-00003.png left, the next image was minigen-00000.png (the first gap, against its
    docstring): numbers keep the order images were made, as A1111 numbers them."""
    from minigen.image import next_free_path

    assert next_free_path(tmp_path / "missing") == tmp_path / "missing" / "minigen-00000.png"
    assert next_free_path(tmp_path) == tmp_path / "minigen-00000.png"
    for name in ("minigen-00003.png", "minigen-notes.png", "other-00009.png", "minigen-00001.png.bak"):
        (tmp_path / name).write_bytes(b"")
    assert next_free_path(tmp_path) == tmp_path / "minigen-00004.png"
    assert next_free_path(tmp_path, "other") == tmp_path / "other-00010.png"


def test_an_older_pillows_sixteen_bit_png_reads_as_sixteen_bit(tmp_path, monkeypatch):
    """Pillow before 10 opened a 16-bit grey PNG as mode "I" (32-bit integers): a PNG's "I" image is its
    16-bit levels, not a 32-bit image of unknown range (refused for other formats)."""
    import minigen.image

    values = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.int32)

    def open_as_older_pillow(path):
        image = Image.fromarray(values, "I")
        image.format = "PNG"
        return image

    (tmp_path / "g16.png").write_bytes(b"")
    monkeypatch.setattr(minigen.image.Image, "open", open_as_older_pillow)
    image = np.asarray(read_image(tmp_path / "g16.png"))
    assert np.array_equal(image[..., 0], np.round(values / 257).astype(np.uint8))

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmem.core.images import image_array, open_image


def _sideways_jpeg(path, upright: np.ndarray) -> None:
    """Store ``upright`` turned a quarter (as a camera does) with the EXIF tag that turns it back."""
    stored = np.rot90(upright, k=1)  # 90 degrees anticlockwise; orientation 6 turns it clockwise on display
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, "JPEG", quality=95, exif=exif.tobytes())


def _upright(h=24, w=40) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 3, :, 0] = 255  # red band on top
    a[:, : w // 4, 2] = 255  # blue band at the left
    return a


def test_exif_orientation_is_applied_as_diffusers_load_image_does(tmp_path):
    from diffusers.utils import load_image as diffusers_load_image

    path = tmp_path / "camera.jpg"
    _sideways_jpeg(path, _upright())
    reference = np.asarray(diffusers_load_image(str(path)), np.float32) / 255.0
    ours = image_array(path)
    assert ours.shape == reference.shape == (24, 40, 3)
    assert np.array_equal(ours, reference)
    for data in (path.read_bytes(), {"bytes": path.read_bytes(), "path": None}, str(path), Image.open(path)):
        assert np.array_equal(image_array(data), reference)
    # the red band is on top once upright
    assert ours[2, 20, 0] > 0.9 and ours[-2, 20, 0] < 0.1


def test_sixteen_bit_greyscale_keeps_its_range_instead_of_turning_white():
    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    ours = image_array(buf.getvalue())
    assert ours.shape == (48, 48, 3)
    assert abs(float(ours.mean()) - 0.5) < 0.01
    assert np.abs(ours[..., 0] - ramp / 65535.0).max() <= 0.5 / 255 + 1e-6
    assert open_image(buf.getvalue()).mode == "RGB"


def test_arrays_are_read_by_dtype_and_shape():
    dark = np.ones((4, 4, 3), np.uint8)  # max 1 in uint8 is nearly black, not white
    assert np.allclose(image_array(dark), 1 / 255)
    assert np.allclose(image_array(np.full((4, 4, 3), 32768, np.uint16)), 32768 / 65535)
    assert np.allclose(image_array(np.full((4, 4, 3), 200, np.int64)), 200 / 255)
    assert np.allclose(image_array(np.full((4, 4, 3), 0.25, np.float32)), 0.25)
    assert np.allclose(image_array(np.full((4, 4, 3), 128.0)), 128 / 255)
    grey = image_array(np.arange(16, dtype=np.uint8).reshape(4, 4))
    assert grey.shape == (4, 4, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255
    assert image_array(rgba).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="shape"):
        image_array(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        image_array(np.full((4, 4, 3), np.nan, np.float32))


def test_scan_pairs_a_camera_photo_with_its_upright_copy(tmp_path):
    from scipy.ndimage import zoom

    from diffmem.scan import DatasetScanner

    rng = np.random.default_rng(3)

    def smooth():
        img = zoom(rng.random((6, 6, 3)), (48 / 6, 64 / 6, 1), order=3)[:48, :64]
        return (np.clip(img, 0, 1) * 255).astype(np.uint8)

    folder = tmp_path / "ds"
    folder.mkdir()
    base = smooth()
    _sideways_jpeg(folder / "camera.jpg", base)
    Image.fromarray(base).save(folder / "upright.png")
    records = [{"file_name": "camera.jpg", "text": "a photo"}, {"file_name": "upright.png", "text": "the same photo"}]
    for i in range(8):
        Image.fromarray(smooth()).save(folder / f"other{i}.png")
        records.append({"file_name": f"other{i}.png", "text": f"another photo {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rows = DatasetScanner(folder, tmp_path / "work", progress=False).scan().rows.set_index("row")
    assert rows.loc[0, "image_cluster"] == rows.loc[1, "image_cluster"] >= 0
    assert (rows.loc[2:, "image_cluster"] != rows.loc[0, "image_cluster"]).all()


def test_training_data_reads_a_camera_photo_upright(tmp_path):
    from diffmem.train.data import load_pairs

    folder = tmp_path / "ds"
    folder.mkdir()
    upright = _upright(40, 40)
    _sideways_jpeg(folder / "camera.jpg", upright)
    Image.fromarray(upright).save(folder / "upright.png")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "camera.jpg", "text": "camera"}) + "\n" + json.dumps({"file_name": "upright.png", "text": "upright"}) + "\n")
    images, captions, problems = load_pairs(str(folder), 16)
    assert problems == [] and sorted(captions) == ["camera", "upright"]
    cam, up = images[captions.index("camera")], images[captions.index("upright")]
    assert np.abs(cam - up).mean() < 0.03  # JPEG noise only; sideways it would be about 0.3


def test_an_image_cell_is_found_in_the_tables_folder_then_the_working_directory(tmp_path, monkeypatch):
    from diffmem.core.images import image_cell

    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert image_cell("a.png", tmp_path / "table") == tmp_path / "table" / "a.png"
    assert image_cell({"bytes": None, "path": "a.png"}, tmp_path / "table") == tmp_path / "table" / "a.png"
    assert image_cell({"bytes": None, "path": "b.png"}, "table") == Path("b.png")
    assert image_cell("b.png", "table", working_directory=False) == Path("table") / "b.png"  # an image folder's own
    assert image_cell({"bytes": b"png", "path": "b.png"}, "table") == {"bytes": b"png", "path": "b.png"}
    for empty in (None, float("nan"), {"bytes": None, "path": None}, "", "  "):
        assert image_cell(empty, "table") is None
    with pytest.raises(FileNotFoundError, match=r"c\.png is in neither the table's folder .*table nor the working directory"):
        image_cell("c.png", "table")


@pytest.mark.parametrize("cell", [7, 2.5, [[0, 1], [1, 0]], {"path": "a.png"}])
def test_an_image_of_a_type_no_reader_takes_is_named_by_its_type(cell):
    # Pillow's own error was "'int' object has no attribute 'read'"
    with pytest.raises(TypeError, match=f"an image is read from a file path, .* not {type(cell).__name__}$"):
        open_image(cell)

import json

import numpy as np

from diffmem.memlab import dataset as ds
from diffmem.memlab.export import export_imagefolder
from diffmem.train.data import load_pairs


def test_export_reads_back_as_an_image_folder(tmp_path):
    n = export_imagefolder(tmp_path, limit=12)
    assert n == 12
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ds.build().captions[:12]
    images, captions, problems = load_pairs(str(tmp_path), 32)
    assert captions == [r["text"] for r in rows] and not problems
    d = ds.build()
    # PNG round trip is 8-bit: within half a step of the rendered float image
    assert np.abs(images[0] - d.image(d.rows[0].image_id)).max() <= 0.5 / 255 + 1e-6
    manifest = json.loads((tmp_path / "memlab_manifest.json").read_text())
    assert manifest["fingerprint"] == d.manifest["fingerprint"]


def test_export_never_overwrites_a_folder_that_is_not_a_memlab_build(tmp_path):
    import pytest

    from diffmem.core.errors import InputError

    theirs = tmp_path / "their_data"
    (theirs / "images").mkdir(parents=True)
    (theirs / "images" / "00000.png").write_bytes(b"their image")
    (theirs / "metadata.jsonl").write_text('{"file_name": "images/00000.png", "text": "their caption"}\n')
    with pytest.raises(InputError, match="not an earlier MemLab build"):
        export_imagefolder(theirs, limit=3)
    assert (theirs / "images" / "00000.png").read_bytes() == b"their image"
    assert (theirs / "metadata.jsonl").read_text() == '{"file_name": "images/00000.png", "text": "their caption"}\n'
    assert sorted(p.name for p in theirs.rglob("*")) == ["00000.png", "images", "metadata.jsonl"]


def test_a_smaller_build_over_an_earlier_one_leaves_no_stray_images(tmp_path):
    export_imagefolder(tmp_path, limit=12)
    n = export_imagefolder(tmp_path, limit=5)
    assert n == 5 and len((tmp_path / "metadata.jsonl").read_text().splitlines()) == 5
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "memlab_manifest.json", "metadata.jsonl"]
    images, captions, problems = load_pairs(str(tmp_path), 32)
    assert len(captions) == 5 and not problems

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

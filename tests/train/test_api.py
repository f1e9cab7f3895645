import json
import shutil

import pytest
from PIL import Image

from diffmem.train.api import train_pipeline
from diffmem.train.trainer import CHECKPOINT_DIR


def test_skipped_rows_are_warned_and_a_fixed_rerun_leaves_no_stale_list(tmp_path, tiny_pipe_dir,
                                                                         colour_folder_with_a_broken_row):
    data = colour_folder_with_a_broken_row
    out = tmp_path / "out"
    common = dict(steps=1, batch_size=2, checkpoint_every=0, progress=False)
    with pytest.warns(UserWarning, match=r"1 of 4 rows of .* skipped \(the first: row 3, unreadable image"):
        train_pipeline(str(tiny_pipe_dir), str(data), out, **common)
    assert [p["row"] for p in json.loads((out / "data_problems.json").read_text())] == [3]

    # the user mends the image and runs again (the first run killed before it saved a checkpoint):
    # the list of problems must not outlive them
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(data / "broken.png")
    model_dir = train_pipeline(str(tiny_pipe_dir), str(data), out, **common)
    assert json.loads((model_dir / "diffmem_train.json").read_text())["skipped_rows"] == 0
    assert not (out / "data_problems.json").exists()

"""memlab train / verify / sample take --device like every other command: a device that is not
there is one clear error before any folder is made."""

import pytest
import torch

from diffmem import cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "verify", "sample"])
def test_a_missing_gpu_is_a_clear_error_and_writes_nothing(command, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["memlab", command, "--out", str(out), "--device", "cuda"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "CUDA is not available" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_api_takes_the_device_too(tmp_path):
    from diffmem.core.errors import ModelLoadError
    from diffmem.memlab import recipe
    from diffmem.memlab.sample import sample_grid
    from diffmem.memlab.verify import verify

    for call in (lambda: recipe.run(recipe.MemLabRecipe(), tmp_path / "train", progress=False, device="cuda"),
                 lambda: verify("memlab", progress=False, out=tmp_path / "verify", device="cuda"),
                 lambda: sample_grid("memlab", tmp_path / "sample", device="cuda")):
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            call()
    assert not any(tmp_path.iterdir())

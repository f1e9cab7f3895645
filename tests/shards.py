"""WebDataset shards for the scan and train tests (importable: pytest's ``pythonpath`` holds tests/)."""


def random_png(seed: int, size: int = 24) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar_shard(path, members) -> None:
    """A WebDataset shard: (member name, bytes) pairs in order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# (image seed, caption): samples 0 and 3 share an image, as a duplicated training image does
SHARD_SAMPLES = [(0, "a red barn at dawn"), (1, "a lighthouse"), (2, "a tabby cat"), (0, "a red barn at dawn, again"),
                 (4, "a bowl of ramen"), (5, "a mountain lake")]


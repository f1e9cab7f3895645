import io

import numpy as np

from diffmem.scan.features import phash64, thumbnail
from diffmem.scan.image_duplicates import image_clusters


def _smooth(rng, size=64):
    from scipy.ndimage import zoom

    return np.clip(zoom(rng.random((6, 6, 3)), (size / 6, size / 6, 1), order=3)[:size, :size], 0, 1).astype(np.float32)


def _jpeg(img):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buf, format="JPEG", quality=70)
    return np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255


def test_clusters_copies_reencodes_and_shared_layouts_but_not_unrelated_images():
    rng = np.random.default_rng(0)
    base, layout = _smooth(rng), _smooth(rng)
    images = [base, base.copy(), _jpeg(base)]  # exact copy and a re-encode
    for k in range(4):  # one layout, a different object each time (a template)
        img = layout.copy()
        y, x = rng.integers(8, 40, 2)
        img[y:y + 16, x:x + 16] = rng.random(3)
        images.append(img)
    images += [_smooth(rng) for _ in range(40)]
    thumbs = np.stack([thumbnail(i) for i in images])
    hashes = np.array([phash64(i) for i in images], np.int64)
    valid = np.ones(len(images), bool)
    valid[-1] = False  # an unreadable image takes no part
    cl = image_clusters(hashes, thumbs, valid)
    assert cl.labels[0] == cl.labels[1] == cl.labels[2] >= 0
    assert len(set(cl.labels[3:7])) == 1 and cl.labels[3] >= 0 and cl.labels[3] != cl.labels[0]
    assert (cl.labels[7:] == -1).all()
    assert np.isnan(cl.score[-1]) and cl.score[0] == 1.0
    assert sorted(cl.sizes.values()) == [3, 4]


def test_blank_images_are_copies_only_of_blanks_of_their_own_colour():
    # a flat image's hash has no structure to threshold: black, grey and white placeholders all hashed
    # alike and were one cluster, and two blank thumbnails agreed on "all of their informative pixels"
    rng = np.random.default_rng(0)
    blanks = [np.full((64, 64, 3), v, np.float32) for v in (0.0, 0.5, 1.0)]
    images = blanks + [_jpeg(blanks[2]), np.full((8, 8, 3), 0.5, np.float32)]  # a re-encode, another size
    images += [_smooth(rng) for _ in range(10)]
    thumbs = np.stack([thumbnail(i) for i in images])
    hashes = np.array([phash64(i) for i in images], np.int64)
    # what misled the hash links: the blanks' hashes differ in at most one bit (black's DC term)
    assert max(bin((int(h) ^ int(hashes[0])) & (2**64 - 1)).count("1") for h in hashes[:5]) <= 1
    cl = image_clusters(hashes, thumbs, np.ones(len(images), bool))
    assert cl.labels[0] == -1  # black: a blank of no other's colour
    assert cl.labels[1] == cl.labels[4] >= 0 and cl.labels[2] == cl.labels[3] >= 0 and cl.labels[1] != cl.labels[2]
    assert (cl.labels[5:] == -1).all() and sorted(cl.sizes.values()) == [2, 2]
    # and in chunks of any size alike
    from diffmem.scan.image_duplicates import _unless_blanks_of_other_colours

    flat = thumbs.reshape(len(thumbs), -1)
    a, b = np.triu_indices(5, 1)
    for chunk in (1, 3, 100):
        kept = _unless_blanks_of_other_colours(flat, thumbs.shape[1:], a, b, 0.6, chunk=chunk)
        assert sorted(zip(*map(np.ndarray.tolist, kept))) == [(1, 4), (2, 3)]


def test_pair_agreement_in_chunks_equals_all_pairs_at_once():
    from diffmem.scan.features import flat_pixels, informative_agreement
    from diffmem.scan.image_duplicates import _pair_agreement

    rng = np.random.default_rng(0)
    thumbs = np.repeat(np.repeat(rng.integers(0, 256, (23, 4, 4, 3), dtype=np.uint8), 2, 1), 2, 2)
    thumbs[5, :4] = 0  # flat regions count differently: keep some
    flat = thumbs.reshape(len(thumbs), -1)
    i, j = rng.integers(0, len(thumbs), 101), rng.integers(0, len(thumbs), 101)
    fp = flat_pixels(thumbs)
    whole = informative_agreement(flat[i], flat[j], fp[i], fp[j]).astype(np.float32)
    for chunk in (1, 7, 1000):
        np.testing.assert_array_equal(_pair_agreement(flat, thumbs.shape[1:], i, j, chunk=chunk), whole)

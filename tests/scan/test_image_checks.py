import io

import numpy as np
import pytest

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


def test_exact_copies_are_found_as_a_sort_of_the_pixels_finds_them(monkeypatch):
    # matched by digests, not by np.unique(axis=0), whose sorted copies of every thumbnail were the
    # scan's peak memory (1.8 GB beside 0.6 GB of thumbnails at 200,000 images)
    import hashlib

    from diffmem.scan.image_duplicates import _exact_copies

    rng = np.random.default_rng(0)
    flat = rng.integers(0, 256, (300, 48), dtype=np.uint8)
    flat[[7, 150, 299]] = flat[3]
    flat[[40, 41]] = flat[200]  # a copy before its first row's own copy ... and after it
    want_first = np.sort(np.unique(flat, axis=0, return_index=True)[1])

    def check(first, inverse):
        assert np.array_equal(first, want_first)  # each image at its first row, in row order
        np.testing.assert_array_equal(flat[first[inverse]], flat)  # every row points at its own pixels

    for chunk in (1, 64, 1000):
        check(*_exact_copies(flat, chunk=chunk))
    # every row of one digest (a collision, or a digest that stops telling them apart): the pixels decide
    blake2b = hashlib.blake2b
    monkeypatch.setattr(hashlib, "blake2b", lambda data, digest_size: blake2b(b"same", digest_size=digest_size))
    check(*_exact_copies(flat, chunk=64))
    alone = rng.integers(0, 256, (50, 48), dtype=np.uint8)  # no copies: the rows in order, one image each
    first, inverse = _exact_copies(alone)
    assert np.array_equal(first, np.arange(50)) and np.array_equal(inverse, np.arange(50))


def _smooth_thumbs(rng, n, size=32):
    """Smooth random images (a 6 x 6 field, as MemLab's backgrounds) as flat uint8 thumbnails."""
    from scipy.ndimage import zoom

    small = rng.random((n, 6, 6, 3))
    return (np.clip(zoom(small, (1, size / 6, size / 6, 1), order=1), 0, 1) * 255).astype(np.uint8)


def test_the_approximate_index_is_the_exact_search_where_its_components_keep_everything():
    # below 78 rows there is a single list, and 128 principal components keep every distance
    from diffmem.scan.image_duplicates import _neighbour_pairs

    rng = np.random.default_rng(0)
    for n in (2, 7, 64):
        vectors = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        exact = _neighbour_pairs(vectors, 10, "exact")
        approx = _neighbour_pairs(vectors, 10, "approximate")
        assert sorted(zip(*map(np.ndarray.tolist, exact[:2]))) == sorted(zip(*map(np.ndarray.tolist, approx[:2])))
        order_e, order_a = np.lexsort(exact[:2][::-1]), np.lexsort(approx[:2][::-1])
        np.testing.assert_allclose(approx[2][order_a], exact[2][order_e], atol=1e-5)  # exact cosines, not PCA's
        assert _neighbour_pairs(vectors, 10, "approximate", cosine=False)[2] is None
    with pytest.raises(ValueError, match="unknown neighbour index 'hnsw'"):
        image_clusters(np.zeros(len(vectors), np.int64), vectors.reshape(-1, 32, 32, 3), np.ones(len(vectors), bool),
                       index="hnsw")


def test_the_approximate_index_finds_the_near_copies_and_layouts_the_exact_one_finds():
    # 3,000 smooth images (so the inverted lists are searched in part, 32 of 76), with a group of
    # noisy copies and a template: one layout under a changed object
    rng = np.random.default_rng(1)
    thumbs = _smooth_thumbs(rng, 3000)
    noise = rng.integers(-3, 4, (11, 32, 32, 3))
    thumbs[1:12] = np.clip(thumbs[0].astype(np.int16) + noise, 0, 255)
    for k in range(20, 28):
        thumbs[k] = thumbs[20]
        y, x = rng.integers(0, 24, 2)
        thumbs[k, y:y + 8, x:x + 8] = rng.integers(0, 256, 3)
    hashes = rng.integers(0, 2**62, len(thumbs)).astype(np.int64)  # no hash links: the search alone
    valid = np.ones(len(thumbs), bool)
    exact = image_clusters(hashes, thumbs, valid, index="exact")
    approx = image_clusters(hashes, thumbs, valid, index="approximate")
    np.testing.assert_array_equal(approx.labels, exact.labels)
    assert exact.labels[0] == exact.labels[11] >= 0 and exact.labels[20] == exact.labels[27] >= 0
    assert len(set(exact.labels[:12])) == 1 and len(set(exact.labels[20:28])) == 1
    # and the same twice: faiss seeds its k-means, the PCA sample is seeded
    np.testing.assert_array_equal(image_clusters(hashes, thumbs, valid, index="approximate").score, approx.score)


def test_neighbour_recall_measures_what_the_approximate_index_misses():
    from diffmem.scan.image_duplicates import neighbour_recall

    rng = np.random.default_rng(2)
    # below 78 rows the index is exact: all found
    assert neighbour_recall(rng.integers(0, 256, (60, 3072), dtype=np.uint8), 10, 20) == 1.0
    # smooth images have the low-dimensional structure the components keep; independent random pixels
    # have none, and 128 components of 3,072 lose most of their neighbours
    smooth = neighbour_recall(_smooth_thumbs(rng, 3000).reshape(3000, -1), 10, 200)
    noise = neighbour_recall(rng.integers(0, 256, (3000, 3072), dtype=np.uint8), 10, 200)
    assert smooth >= 0.9 and noise < 0.5, (smooth, noise)

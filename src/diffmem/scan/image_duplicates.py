"""Image near-duplicates: perceptual-hash copies and thumbnail neighbours, grouped into clusters.

Two rows are linked when

- their 64-bit perceptual hashes differ in at most ``max_hamming`` bits (exact and near-exact
  copies: re-encodes, resizes, small crops), found by exact matching on hash blocks, and, for two
  blank images, whose hashes agree whatever their colour, their colours agree too; or
- one is among the other's ``neighbours`` nearest thumbnails (cosine) and their informative-pixel
  agreement is at least ``min_agreement`` (looser copies: a shared layout under a changed object,
  as in MemLab's templates or a product shot re-used with another caption); or
- an optional embedding from a local model (SSCD, CLIP) puts them within ``min_cosine``.

Clusters are the connected components of these links. The neighbour search is exact (sklearn,
brute force) by default, whose time grows with the square of the count: fine up to about 10^5
images on a CPU. ``index="approximate"`` searches an inverted-file index instead (faiss IVF over
the vectors' top 128 principal components, after scaling each to unit length, so that distances
there follow the cosine): its time grows about as the count to the power 1.5, and it finds most
but not all of the exact neighbours (``benchmarks/scan_image_scale.py`` measures how many).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .features import flat_pixels, hamming, informative_agreement, pixel_agreement


@dataclass
class ImageClusters:
    labels: np.ndarray  # (N,) cluster id (largest cluster first), -1 for rows in no cluster or without image
    score: np.ndarray  # (N,) similarity to the most similar other row, in [0, 1]; NaN without image
    sizes: dict[int, int]


def _hash_pairs(hashes: np.ndarray, max_hamming: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of indices whose hashes differ in <= max_hamming bits, without comparing all pairs:
    with max_hamming + 1 disjoint bit blocks, two such hashes agree exactly on at least one block."""
    u = hashes.astype(np.int64).view(np.uint64)
    edges = np.linspace(0, 64, max_hamming + 2).astype(int)
    a_all, b_all = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        key = (u >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        ks = key[order]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        ends = np.r_[starts[1:], len(ks)]
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            members = order[s:e]
            if e - s <= 64:
                i, j = np.triu_indices(e - s, 1)
                i, j = members[i], members[j]
            else:  # a huge bucket (a blank image repeated): links to its first member keep it one cluster
                i, j = np.full(e - s - 1, members[0]), members[1:]
            close = hamming(hashes[i], hashes[j]) <= max_hamming
            a_all.append(i[close])
            b_all.append(j[close])
    if not a_all:
        return np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(a_all), np.concatenate(b_all)


PAIR_CHUNK = 8192  # images or neighbour pairs compared at once: bounds the temporaries, not the result


def _unless_blanks_of_other_colours(flat: np.ndarray, shape: tuple, a: np.ndarray, b: np.ndarray,
                                    min_agreement: float, chunk: int = PAIR_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The hash pairs ``a``, ``b`` less those of two blank images (flat all over) whose colours differ:
    a flat image's DCT has no structure for the hash to threshold, so a black, a grey and a white
    placeholder all hashed alike and were called copies of each other. Rows of ``flat`` are
    flattened thumbnails of ``shape``."""
    if not len(a):
        return a, b
    paired = np.unique(np.concatenate([a, b]))  # only images with a hash pair need looking at
    blank = np.zeros(len(flat), bool)
    for s in range(0, len(paired), chunk):
        rows = paired[s : s + chunk]
        blank[rows] = flat_pixels(flat[rows].reshape(-1, *shape)).all(1)
    both = np.flatnonzero(blank[a] & blank[b])
    keep = np.ones(len(a), bool)
    for s in range(0, len(both), chunk):
        k = both[s : s + chunk]
        keep[k] = pixel_agreement(flat[a[k]], flat[b[k]]) >= min_agreement
    return a[keep], b[keep]


INDEXES = ("exact", "approximate")
APPROXIMATE_DIMS = 128  # principal components the approximate index searches
APPROXIMATE_PROBES = 32  # inverted lists searched per query: more finds more exact neighbours, slower
APPROXIMATE_TRAINING_ROWS = 20_000  # rows the principal components are fitted on


def _neighbour_pairs(vectors: np.ndarray, k: int, index: str = "exact", cosine: bool = True,
                     chunk: int = PAIR_CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Each row's ``k`` nearest other rows by cosine, as pairs ``i``, ``j`` and, if ``cosine``,
    their cosine (the approximate index's cost it apart: the thumbnails' links do without it)."""
    k = min(k, len(vectors) - 1)
    if index == "approximate":
        i, j = _approximate_neighbours(vectors, k, chunk)
        if not cosine:
            return i, j, None
        cos = np.empty(len(i), np.float32)
        for s in range(0, len(i), chunk):
            cos[s : s + chunk] = (_unit(vectors[i[s : s + chunk]]) * _unit(vectors[j[s : s + chunk]])).sum(1)
        return i, j, cos
    from sklearn.neighbors import NearestNeighbors

    vectors = vectors.astype(np.float32, copy=False)
    dist, nbrs = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(vectors).kneighbors(vectors)
    i = np.repeat(np.arange(len(vectors)), k + 1)
    j = nbrs.ravel()
    keep = i != j
    return i[keep], j[keep], 1.0 - dist.ravel()[keep]


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _approximate_neighbours(vectors: np.ndarray, k: int, chunk: int = PAIR_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """About each row's ``k`` nearest other rows by cosine, from faiss's inverted-file index.

    Unit rows make the squared distance 2 - 2 cosine, and PCA keeps distances up to what its
    components leave out, so the nearest in 128 components are nearly the nearest by cosine. Rows
    are converted to float32 a chunk at a time: a million 32 x 32 thumbnails are 3 GB as uint8,
    12 GB as float32. Deterministic: faiss seeds its k-means, and the PCA sample is seeded."""
    import faiss
    from sklearn.decomposition import PCA

    n, d = vectors.shape
    dims = min(APPROXIMATE_DIMS, d, n)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, min(n, APPROXIMATE_TRAINING_ROWS), replace=False))
    # randomized: a third of the time of faiss's full eigendecomposition of 3,072 dimensions
    pca = PCA(dims, svd_solver="randomized", random_state=0).fit(_unit(vectors[sample]))
    reduced = np.ascontiguousarray(np.concatenate([pca.transform(_unit(vectors[s : s + chunk]))
                                                   for s in range(0, n, chunk)]), dtype=np.float32)
    # about 4 sqrt(n) lists, each trained on at least 39 rows as faiss asks
    lists = max(1, min(int(4 * np.sqrt(n)), n // 39))
    if lists == 1:  # too few rows for lists: search the components in full
        index = faiss.IndexFlatL2(dims)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dims), dims, lists)
        index.train(reduced)
        index.nprobe = min(lists, APPROXIMATE_PROBES)
    index.add(reduced)
    _, nbrs = index.search(reduced, k + 1)
    i = np.repeat(np.arange(n), k + 1)
    j = nbrs.ravel().astype(np.int64)
    keep = (j >= 0) & (i != j)  # -1: fewer than k + 1 rows in the lists searched
    return i[keep], j[keep]


def neighbour_recall(vectors: np.ndarray, k: int = 10, queries: int = 1000, block: int = 65536) -> float:
    """Share of the exact ``k`` nearest neighbours (cosine) of ``queries`` evenly spaced rows that the
    approximate index returns for them: what the approximate search misses, measured on your data."""
    from sklearn.neighbors import NearestNeighbors

    q = np.unique(np.linspace(0, len(vectors) - 1, min(queries, len(vectors))).astype(int))
    i, j, _ = _neighbour_pairs(vectors, k, "approximate", cosine=False)
    asked = np.isin(i, q)
    found: dict[int, set] = {}
    for a, b in zip(i[asked].tolist(), j[asked].tolist()):
        found.setdefault(a, set()).add(b)
    dists, idxs = [], []
    for s in range(0, len(vectors), block):  # the exact search a block of rows at a time: bounded memory
        rows = vectors[s : s + block].astype(np.float32)
        nn = NearestNeighbors(n_neighbors=min(k + 1, len(rows)), metric="cosine", algorithm="brute").fit(rows)
        d, x = nn.kneighbors(vectors[q].astype(np.float32))
        dists.append(d)
        idxs.append(x + s)
    dist, idx = np.concatenate(dists, 1), np.concatenate(idxs, 1)
    hits = []
    for r, row in enumerate(q.tolist()):
        nearest = [x for x in idx[r][np.argsort(dist[r], kind="stable")].tolist() if x != row][:k]
        hits.append(len(set(nearest) & found.get(row, set())) / max(len(nearest), 1))
    return float(np.mean(hits))


def _exact_copies(flat: np.ndarray, chunk: int = PAIR_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``flat`` whose pixels no earlier row has (``first``, in row order), and for each
    row the position in ``first`` of the row it copies or is (``inverse``).

    Rows are matched by a 64-bit digest each, then checked pixel for pixel against the row they
    matched: ``np.unique(flat, axis=0)`` sorted copies of the whole array, near three times its
    size at its peak (1.8 GB beside 0.6 GB of thumbnails at 200,000 images), where the digests
    take 8 bytes a row. Two rows of one digest and other pixels (a chance of about 3 in 10^8 at a
    million distinct rows) leave it to that exact sort."""
    import hashlib

    n = len(flat)
    digests = np.fromiter((int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
                           for row in flat), np.uint64, n)
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    for s in range(0, n, chunk):
        if not np.array_equal(flat[s : s + chunk], flat[first[inverse[s : s + chunk]]]):
            _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
            inverse = inverse.ravel()
            break
    order = np.argsort(first, kind="stable")  # each image at its first row, in row order
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse]


def _pair_agreement(uniq: np.ndarray, shape: tuple, i: np.ndarray, j: np.ndarray, chunk: int = PAIR_CHUNK) -> np.ndarray:
    """``informative_agreement`` of the flattened thumbnails ``uniq[i]`` and ``uniq[j]``, a chunk at a
    time: all pairs at once (10 a row) took about 300 KB of temporaries per row: 5.7 GB peak at 20,000
    images, about 17 GB at 60,000 by extrapolation."""
    # packed to a bit a pixel: as bools, a million thumbnails' masks took 3 GB
    width = uniq.shape[1]
    flat = np.concatenate([np.packbits(flat_pixels(uniq[s : s + chunk].reshape(-1, *shape)), axis=1)
                           for s in range(0, len(uniq), chunk)])
    out = np.empty(len(i), np.float32)
    for s in range(0, len(i), chunk):
        a, b = i[s : s + chunk], j[s : s + chunk]
        out[s : s + chunk] = informative_agreement(uniq[a], uniq[b], np.unpackbits(flat[a], axis=1, count=width).view(bool),
                                                   np.unpackbits(flat[b], axis=1, count=width).view(bool))
    return out


def image_clusters(phash: np.ndarray, thumbs: np.ndarray, valid: np.ndarray, max_hamming: int = 4,
                   neighbours: int = 10, min_agreement: float = 0.6, embedding: np.ndarray | None = None,
                   min_cosine: float = 0.9, index: str = "exact") -> ImageClusters:
    """Cluster rows ``valid`` (bool, N) from their hashes (int64, N) and uint8 thumbnails (N, S, S, 3);
    ``index``: the neighbour search, exact or approximate (see the module's note)."""
    if index not in INDEXES:
        raise ValueError(f"unknown neighbour index {index!r}: choose from {', '.join(INDEXES)}")
    n = len(valid)
    idx = np.flatnonzero(valid)
    score = np.full(n, np.nan, np.float32)
    if len(idx) < 2:
        if len(idx):
            score[idx] = 0.0
        return ImageClusters(np.full(n, -1), score, {})
    # every row valid (the common case): a view, not a copy (3 GB for a million thumbnails)
    flat = (thumbs if len(idx) == n else thumbs[idx]).reshape(len(idx), -1)
    best = np.zeros(len(idx), np.float32)

    a, b = _hash_pairs(phash[idx], max_hamming)
    a, b = _unless_blanks_of_other_colours(flat, thumbs.shape[1:], a, b, min_agreement)
    best[a] = best[b] = 1.0
    links_a, links_b = [a], [b]

    # exact pixel copies collapse before the neighbour search, so k neighbours are k distinct images;
    # with none (the common case) the search runs on the thumbnails themselves, not a copy
    first, inverse = _exact_copies(flat)
    uniq = flat if len(first) == len(flat) else flat[first]
    links_a.append(np.arange(len(idx)))
    links_b.append(first[inverse])
    best[np.bincount(inverse)[inverse] >= 2] = 1.0
    if len(uniq) >= 2:
        i, j, _ = _neighbour_pairs(uniq, neighbours, index, cosine=False)
        agree = _pair_agreement(uniq, thumbs.shape[1:], i, j)
        best_u = np.zeros(len(uniq), np.float32)
        np.maximum.at(best_u, i, agree)
        best = np.maximum(best, best_u[inverse])
        keep = agree >= min_agreement
        links_a.append(first[i[keep]])
        links_b.append(first[j[keep]])
    if embedding is not None:
        emb = embedding[idx].astype(np.float32)
        i, j, cos = _neighbour_pairs(emb, neighbours, index)
        keep = cos >= min_cosine
        links_a.append(i[keep])
        links_b.append(j[keep])

    ra, rb = np.concatenate(links_a), np.concatenate(links_b)
    graph = coo_matrix((np.ones(len(ra)), (ra, rb)), shape=(len(idx), len(idx)))
    _, comp = connected_components(graph, directed=False)
    counts = np.bincount(comp)
    in_cluster = counts[comp] >= 2
    # number clusters by size, largest first, ties by first row: stable and readable ids
    first_row = np.full(len(counts), len(idx))
    np.minimum.at(first_row, comp, np.arange(len(idx)))
    order = sorted(np.unique(comp[in_cluster]), key=lambda c: (-counts[c], first_row[c]))
    remap = np.full(len(counts), -1)
    remap[order] = np.arange(len(order))
    labels = np.full(n, -1)
    labels[idx] = remap[comp]
    score[idx] = best
    sizes = {int(k): int(v) for k, v in zip(*np.unique(labels[labels >= 0], return_counts=True))}
    return ImageClusters(labels, score, sizes)

"""Caption duplicates: exact after normalization, identical after CLIP truncation, and near-duplicate.

- **exact**: equal normalized captions (case, Unicode form, punctuation and spacing ignored).
- **truncation**: captions that differ but become the same text after CLIP's 77-token truncation.
  The model is conditioned on the same tokens, so for it they are one caption: a word-level
  duplication that a plain string compare misses.
- **near**: MinHash signatures (datasketch) over word unigrams and bigrams, banded into an LSH
  index held in numpy arrays, candidates verified by their estimated Jaccard similarity. No
  all-pairs comparison: cost grows with the number of captions, not its square.

Group ids are numbered by size (largest first); -1 marks a row in no group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

NUM_PERM = 64
BANDS = 16  # 16 bands of 4 rows: a pair with Jaccard 0.8 is a candidate with probability > 0.999


def shingles(norm_caption: str) -> list[bytes]:
    words = norm_caption.split()
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return [g.encode("utf-8") for g in grams] or [b""]


def minhash_signatures(norm_captions: list[str | None]) -> np.ndarray:
    """(N, NUM_PERM) uint32 signatures; rows without a caption are all-zero (never matched)."""
    from datasketch import MinHash

    out = np.zeros((len(norm_captions), NUM_PERM), np.uint32)
    idx = [i for i, c in enumerate(norm_captions) if c]
    if idx:
        hashes = MinHash.bulk([shingles(norm_captions[i]) for i in idx], num_perm=NUM_PERM)
        # datasketch keeps hash values below 2**32, so they fit uint32
        out[idx] = np.stack([h.hashvalues for h in hashes]).astype(np.uint32)
    return out


@dataclass
class CaptionGroups:
    exact: np.ndarray  # (N,) group id or -1
    truncation: np.ndarray  # (N,) group id or -1: same text after truncation, different before
    near: np.ndarray  # (N,) group id or -1: connected near-duplicates (includes exact copies)
    near_score: np.ndarray  # (N,) highest estimated Jaccard with another caption (1.0 for exact copies)


def _group_ids(keys) -> np.ndarray:
    """Ids for equal non-None keys shared by >= 2 rows, largest group first, ties by first row."""
    import pandas as pd

    codes, _ = pd.factorize(pd.Series(keys, dtype=object), use_na_sentinel=True)  # hash-based, no sort
    ids = np.full(len(codes), -1)
    present = codes >= 0
    if not present.any():
        return ids
    counts = np.bincount(codes[present])
    # factorize numbers keys by first appearance, so the code already breaks ties by first row
    order = sorted(np.flatnonzero(counts >= 2), key=lambda g: (-counts[g], g))
    remap = np.full(len(counts), -1)
    remap[order] = np.arange(len(order))
    ids[present] = remap[codes[present]]
    return ids


def _lsh_pairs(sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = NUM_PERM // BANDS
    a_all, b_all, j_all = [], [], []
    for band in range(BANDS):
        block = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
        key = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
        order = np.argsort(key, kind="stable")
        ks = key[order]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        ends = np.r_[starts[1:], len(ks)]
        multi = (ends - starts) >= 2
        for s, e in zip(starts[multi], ends[multi]):
            members = order[s:e]
            if e - s <= 32:
                i, j = np.triu_indices(e - s, 1)
                i, j = members[i], members[j]
            else:  # a crowded bucket: link everyone to its first member (bounded cost)
                i, j = np.full(e - s - 1, members[0]), members[1:]
            jac = (sig[i] == sig[j]).mean(1)
            keep = jac >= threshold
            a_all.append(i[keep])
            b_all.append(j[keep])
            j_all.append(jac[keep])
    if not a_all:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    a, b, jac = np.concatenate(a_all), np.concatenate(b_all), np.concatenate(j_all)
    return a, b, jac


def caption_groups(norm_captions: list[str | None], truncated: list[str | None], signatures: np.ndarray,
                   threshold: float = 0.8) -> CaptionGroups:
    n = len(norm_captions)
    exact = _group_ids(norm_captions)
    # a truncation group: the truncated text is shared by rows whose full captions differ
    trunc_keys = [t if t is not None else c for t, c in zip(truncated, norm_captions)]
    trunc = _group_ids(trunc_keys)
    for g in np.unique(trunc[trunc >= 0]):
        members = np.flatnonzero(trunc == g)
        if len({norm_captions[i] for i in members}) < 2:
            trunc[members] = -1
    trunc = _group_ids([int(g) if g >= 0 else None for g in trunc])

    # near duplicates on distinct captions only: exact copies are already one group
    present = np.array([c is not None and c != "" for c in norm_captions])
    near_score = np.full(n, np.nan, np.float32)
    near = np.full(n, -1)
    idx = np.flatnonzero(present)
    if len(idx) == 0:
        return CaptionGroups(exact, trunc, near, near_score)
    import pandas as pd

    inverse, _ = pd.factorize(pd.Series([norm_captions[i] for i in idx], dtype=object))
    first = np.full(inverse.max() + 1, len(idx))
    np.minimum.at(first, inverse, np.arange(len(idx)))
    usig = signatures[idx[first]]
    a, b, jac = _lsh_pairs(usig, threshold)
    best = np.zeros(len(first), np.float32)
    np.maximum.at(best, a, jac)
    np.maximum.at(best, b, jac)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(first), len(first)))
    _, comp = connected_components(graph, directed=False)
    row_comp = comp[inverse]
    counts = np.bincount(row_comp)
    score = best[inverse]
    score[np.bincount(inverse)[inverse] >= 2] = 1.0
    near_score[idx] = score
    keys: list = [None] * n
    for r, c in zip(idx, row_comp):
        if counts[c] >= 2:
            keys[r] = int(c)
    near = _group_ids(keys)
    return CaptionGroups(exact, trunc, near, near_score)

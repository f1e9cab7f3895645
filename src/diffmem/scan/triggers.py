"""Word-level trigger phrases: n-grams whose captions concentrate on one image-duplicate cluster.

Naseh, Roh and Houmansadr's memory triggers: captions that vary but share a phrase, all paired
with (near) copies of one image, teach the model that the phrase *is* that image. The check:

- units are distinct (normalized caption, image cluster) pairs, so a caption copied verbatim
  counts once: that is caption duplication, reported by its own check;
- a phrase's **support** is the number of units holding it, its **cluster** the image cluster
  holding most of them, its **purity** the share of its units in that cluster;
- a trigger has at least ``min_support`` units in its cluster and purity >= ``min_purity``;
- among phrases with the same units, the longest whose first and last words are themselves
  concentrated on the cluster is kept, and a phrase that merely extends a kept trigger (more
  context around it) is dropped, so each trigger is reported once.

Counting is vectorized: words become integer ids, n-grams 64-bit rolling hashes in numpy arrays
processed in chunks of units, so 10^6 captions take seconds to minutes and bounded memory.
Rows with no image cluster each count as a cluster of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRIME = np.uint64(1099511628211)  # FNV prime: a good multiplier for a rolling 64-bit hash


@dataclass
class TriggerPhrases:
    table: "object"  # pandas frame: phrase, n_words, cluster, support, in_cluster, purity, rows, examples
    row_flag: np.ndarray  # (N,) bool: the row's caption holds a trigger and its image is in that cluster
    row_score: np.ndarray  # (N,) highest purity of a trigger in the row's caption (0 if none)


def _encode(captions: list[str], max_words: int) -> tuple[np.ndarray, list[str]]:
    vocab: dict[str, int] = {}
    lengths = np.zeros(len(captions), np.int32)
    seqs = []
    for k, c in enumerate(captions):
        ids = [vocab.setdefault(w, len(vocab)) for w in c.split()[:max_words]]
        seqs.append(ids)
        lengths[k] = len(ids)
    width = int(lengths.max()) if len(lengths) else 0
    tokens = np.full((len(captions), max(width, 1)), -1, np.int64)
    for k, ids in enumerate(seqs):
        tokens[k, : len(ids)] = ids
    words = [None] * len(vocab)
    for w, i in vocab.items():
        words[i] = w
    return tokens, words


def _ngram_hashes(tokens: np.ndarray, max_n: int):
    """Yield (n, hashes (U, W-n+1) uint64, valid mask) for n = 1..max_n."""
    with np.errstate(over="ignore"):  # wrap-around is the hash
        h = (tokens + 1).astype(np.uint64)
        valid = tokens >= 0
        yield 1, h, valid
        for n in range(2, max_n + 1):
            if tokens.shape[1] < n:
                return
            h = h[:, :-1] * PRIME + (tokens[:, n - 1:] + 1).astype(np.uint64)
            valid = valid[:, :-1] & (tokens[:, n - 1:] >= 0)
            # mix the length in, so an n-gram never collides with a shorter one by construction
            yield n, h ^ np.uint64(n * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF), valid


def _pairs(tokens, max_n, chunk, keep=None):
    """Distinct (unit, n, hash, start) over chunks; ``keep`` filters hashes per n."""
    for lo in range(0, len(tokens), chunk):
        part = tokens[lo:lo + chunk]
        for n, h, valid in _ngram_hashes(part, max_n):
            u, pos = np.nonzero(valid)
            hv = h[u, pos]
            if keep is not None:
                sel = np.isin(hv, keep.get(n, np.zeros(0, np.uint64)))
                u, pos, hv = u[sel], pos[sel], hv[sel]
            if not len(hv):
                continue
            # one count per unit even when a phrase repeats inside a caption
            order = np.lexsort((pos, hv, u))
            u, pos, hv = u[order], pos[order], hv[order]
            first = np.r_[True, (u[1:] != u[:-1]) | (hv[1:] != hv[:-1])]
            yield n, u[first] + lo, hv[first], pos[first]


def find_triggers(norm_captions: list[str | None], clusters: np.ndarray, min_support: int = 5,
                  min_purity: float = 0.9, max_n: int = 8, max_words: int = 64, chunk: int = 100_000,
                  max_examples: int = 5) -> TriggerPhrases:
    import pandas as pd

    n_rows = len(norm_captions)
    clusters = np.asarray(clusters)
    has = np.array([bool(c) for c in norm_captions])
    # rows outside any cluster are clusters of one: a phrase spread over them has low purity
    labels = np.where(clusters >= 0, clusters, -2 - np.arange(n_rows))
    unit_keys = pd.Series([f"{labels[i]}\x00{norm_captions[i]}" if has[i] else None for i in range(n_rows)], dtype=object)
    row_unit, _ = pd.factorize(unit_keys)
    empty = TriggerPhrases(pd.DataFrame(columns=["phrase", "n_words", "cluster", "support", "in_cluster", "purity",
                                                 "rows", "examples"]), np.zeros(n_rows, bool), np.zeros(n_rows))
    if not has.any():
        return empty
    n_units = row_unit.max() + 1
    unit_row = np.full(n_units, n_rows)
    np.minimum.at(unit_row, row_unit[has], np.flatnonzero(has))
    unit_label = labels[unit_row]
    tokens, words = _encode([norm_captions[r] for r in unit_row], max_words)
    rows_per_unit = np.bincount(row_unit[has], minlength=n_units)

    # 1. candidates: phrases held by >= min_support units of one multi-unit cluster
    lab_codes, lab_inv = np.unique(unit_label, return_inverse=True)
    units_per_label = np.bincount(lab_inv)
    big = units_per_label[lab_inv] >= min_support
    cand: dict[int, np.ndarray] = {}
    example_at: dict[tuple[int, int], tuple[int, int]] = {}
    if big.any():
        big_units = np.flatnonzero(big)
        for n, u, hv, pos in _pairs(tokens[big_units], max_n, chunk):
            u = big_units[u]
            key = np.stack([lab_inv[u].astype(np.uint64), hv], 1)
            uniq, inv, cnt = np.unique(key, axis=0, return_inverse=True, return_counts=True)
            ok = cnt >= min_support
            if ok.any():
                cand[n] = np.unique(np.r_[cand.get(n, np.zeros(0, np.uint64)), uniq[ok, 1]])
                inv = inv.ravel()
                hit = np.flatnonzero(ok[inv])
                for k in hit[np.unique(inv[hit], return_index=True)[1]]:
                    example_at.setdefault((n, int(hv[k])), (int(u[k]), int(pos[k])))
    if not cand:
        return empty

    # 2. support and purity of the candidates over all units (chunked: bounded memory)
    recs = []
    for n, u, hv, pos in _pairs(tokens, max_n, chunk, keep=cand):
        recs.append((np.full(len(u), n, np.int16), u, hv))
    n_all = np.concatenate([r[0] for r in recs])
    u_all = np.concatenate([r[1] for r in recs])
    h_all = np.concatenate([r[2] for r in recs])
    frame = pd.DataFrame({"n": n_all, "h": h_all, "unit": u_all, "label": lab_inv[u_all]})
    support = frame.groupby(["n", "h"]).size().rename("support")
    per_label = frame.groupby(["n", "h", "label"]).size().rename("in_cluster").reset_index()
    per_label = per_label.sort_values(["n", "h", "in_cluster", "label"], ascending=[True, True, False, True])
    top = per_label.drop_duplicates(["n", "h"]).set_index(["n", "h"]).join(support)
    top["purity"] = top["in_cluster"] / top["support"]
    top = top[(top["in_cluster"] >= min_support) & (top["purity"] >= min_purity)].reset_index()
    if top.empty:
        return empty

    # 3. one report per trigger: longest phrase among equal unit sets, drop extensions of a kept one
    weights = np.random.default_rng(0).integers(1, 2**63, n_units, dtype=np.int64).view(np.uint64)
    kept_keys = set(zip(top["n"], top["h"]))
    sel = [(a, b) in kept_keys for a, b in zip(frame["n"], frame["h"])]
    fp = frame[sel].assign(w=lambda f: weights[f["unit"].to_numpy()])
    with np.errstate(over="ignore"):
        fingerprint = fp.groupby(["n", "h"])["w"].apply(lambda w: np.bitwise_xor.reduce(w.to_numpy()))
    top["set"] = [fingerprint[(a, b)] for a, b in zip(top["n"], top["h"])]

    def phrase_of(n, h):
        u, pos = example_at[(int(n), int(np.uint64(h)))]
        return " ".join(words[t] for t in tokens[u, pos:pos + n])

    top["phrase"] = [phrase_of(a, b) for a, b in zip(top["n"], top["h"])]
    # a phrase's edges should be trigger words themselves: "in town velvet harbor" has the same
    # captions as "velvet harbor" when every one says "in town", but "town" is everywhere else too
    pure_words = {(int(lab), int(h)) for lab, n_, h in zip(top["label"], top["n"], top["h"]) if n_ == 1}

    def clean_edges(n, h, label):
        u, pos = example_at[(int(n), int(np.uint64(h)))]
        first, last = tokens[u, pos] + 1, tokens[u, pos + n - 1] + 1
        return (int(label), int(first)) in pure_words and (int(label), int(last)) in pure_words

    top["clean"] = [clean_edges(a, b, c) for a, b, c in zip(top["n"], top["h"], top["label"])]
    top = top.sort_values(["label", "set", "clean", "n"], ascending=[True, True, False, False])
    top = top.drop_duplicates(["label", "set"], keep="first")
    top = top.sort_values(["label", "n"])
    keep_rows, kept_by_label = [], {}
    for rec in top.itertuples():
        inner = kept_by_label.setdefault(rec.label, [])
        padded = f" {rec.phrase} "
        if any(f" {q} " in padded for q in inner):
            continue
        inner.append(rec.phrase)
        keep_rows.append(rec.Index)
    top = top.loc[keep_rows]

    # 4. rows, examples and per-row flags
    out_rows = []
    row_flag = np.zeros(n_rows, bool)
    row_score = np.zeros(n_rows)
    unit_best = np.zeros(n_units)
    unit_hit = np.zeros(n_units, bool)
    for rec in top.itertuples():
        members = frame.loc[(frame["n"] == rec.n) & (frame["h"] == rec.h), "unit"].to_numpy()
        in_cl = members[lab_inv[members] == rec.label]
        unit_best[members] = np.maximum(unit_best[members], rec.purity)
        unit_hit[in_cl] = True
        out_rows.append({
            "phrase": rec.phrase, "n_words": int(rec.n), "cluster": int(lab_codes[rec.label]),
            "support": int(rec.support), "in_cluster": int(rec.in_cluster), "purity": float(rec.purity),
            "rows": int(rows_per_unit[members].sum()),
            "examples": [norm_captions[unit_row[u]] for u in in_cl[:max_examples]],
        })
    valid_rows = np.flatnonzero(has)
    row_flag[valid_rows] = unit_hit[row_unit[valid_rows]]
    row_score[valid_rows] = unit_best[row_unit[valid_rows]]
    table = pd.DataFrame(out_rows).sort_values(["in_cluster", "phrase"], ascending=[False, True]).reset_index(drop=True)
    return TriggerPhrases(table, row_flag, row_score)

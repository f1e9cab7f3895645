"""Scan speed at scale: the caption and trigger checks on N synthetic captions (default 10^6).

The synthetic set mimics a text-only web crawl (captions plus an image key, such as a URL):
- background captions of 6-16 words drawn from a Zipf vocabulary, each with its own image;
- exact duplicate groups (one caption re-posted with one image) and near duplicates (one word
  changed); long captions (about 90 words) that differ only after CLIP's 77-token truncation;
- trigger phrases: two or three made-up words appended to otherwise varied captions that all come
  with one image (the memory-trigger pattern), and decoy phrases appended the same way to captions
  whose images all differ (a shared phrase that is *not* a trigger).

It runs ``DatasetScanner`` end to end (sharded feature pass with checkpoints, then the global pass),
and prints wall time, peak memory (max RSS of this process) and trigger recall / precision
against the planted phrases.

    python benchmarks/scan_speed.py [--rows 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from diffmem.bench.memory import peak_rss_mb


def synthetic(rows: int, seed: int = 0, triggers: int = 200, per_trigger: int = 30, decoys: int = 200,
              dup_groups: int = 5000, dup_copies: int = 5, long_groups: int = 1000, long_copies: int = 3):
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(20000)])
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    p /= p.sum()

    def phrase_words(k):
        return " ".join(f"zz{rng.integers(10**9)}" for _ in range(k))

    def body(n):
        lengths = rng.integers(6, 17, n)
        words = vocab[rng.choice(len(vocab), int(lengths.sum()), p=p)]
        out, at = [], 0
        for L in lengths:
            out.append(" ".join(words[at:at + L]))
            at += L
        return out

    planted = {phrase_words(int(rng.integers(2, 4))): k for k in range(triggers)}
    decoy = [phrase_words(int(rng.integers(2, 4))) for _ in range(decoys)]
    n_special = triggers * per_trigger + decoys * per_trigger + dup_groups * dup_copies + long_groups * long_copies
    if n_special > rows // 2:
        raise SystemExit(f"--rows must be at least {2 * n_special} for the planted structure")
    captions = body(rows)
    keys = [f"img{i}" for i in range(rows)]
    slots = rng.permutation(rows)
    at = 0
    for phrase, k in planted.items():
        for r in slots[at:at + per_trigger]:
            captions[r] = f"{captions[r]} {phrase}"
            keys[r] = f"trigger{k}"
        at += per_trigger
    for phrase in decoy:
        for r in slots[at:at + per_trigger]:
            captions[r] = f"{captions[r]} {phrase}"
        at += per_trigger
    for g in range(dup_groups):
        src = captions[slots[at]]
        for c, r in enumerate(slots[at:at + dup_copies]):
            words = src.split()
            if c % 2 and len(words) > 8:  # every other copy a near duplicate: its last word changed
                words[-1] = "changed"
            captions[r] = " ".join(words)
            keys[r] = f"dup{g}"
        at += dup_copies
    for g in range(long_groups):  # long captions that differ only after CLIP's 77 tokens
        head = " ".join(body(8))
        for c, r in enumerate(slots[at:at + long_copies]):
            captions[r] = f"{head} ending{c}"
        at += long_copies
    return captions, keys, set(planted), long_groups


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=50_000)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from diffmem.scan import DatasetScanner, ListSource

    t0 = time.perf_counter()
    captions, keys, planted, long_groups = synthetic(args.rows)
    t_build = time.perf_counter() - t0
    rss_after_build = peak_rss_mb() / 1024
    with tempfile.TemporaryDirectory() as work:
        t1 = time.perf_counter()
        scanner = DatasetScanner(ListSource(captions, image_keys=keys, name="synthetic"), work,
                                 checks=["image_duplicates", "caption_duplicates", "triggers"],
                                 shard_size=args.shard_size)
        scanner.run_pass1()
        t_pass1 = time.perf_counter() - t1
        t2 = time.perf_counter()
        result = scanner.scan()
        t_pass2 = time.perf_counter() - t2
    found = set(result.triggers["phrase"]) if len(result.triggers) else set()
    hit = len(found & planted)
    summary = result.summary.set_index("check")
    figures = {
        "rows": args.rows,
        "build_seconds": round(t_build, 1),
        "scan_pass1_seconds": round(t_pass1, 1),
        "scan_pass2_seconds": round(t_pass2, 1),
        "scan_total_seconds": round(t_pass1 + t_pass2, 1),
        "peak_rss_gib": round(peak_rss_mb() / 1024, 2),
        "rss_after_building_captions_gib": round(rss_after_build, 2),
        "trigger_recall": hit / len(planted),
        "trigger_precision": hit / max(len(found), 1),
        "trigger_phrases_found": len(found),
        "caption_duplicates": summary.loc["caption_duplicates", "detail"],
        "truncation_groups_planted": long_groups,
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        from diffmem.core.results import dump_json

        dump_json(figures, args.json)


if __name__ == "__main__":
    main()

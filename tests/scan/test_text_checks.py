import numpy as np
import pytest

from diffmem.scan.caption_duplicates import caption_groups, minhash_signatures
from diffmem.scan.features import TruncationKeys, normalize_caption
from diffmem.scan.triggers import find_triggers


def _groups(captions, threshold=0.8):
    norm = [normalize_caption(c) for c in captions]
    norm = [c if c else None for c in norm]
    return caption_groups(norm, TruncationKeys()(norm), minhash_signatures(norm), threshold)


def test_exact_groups_ignore_case_punctuation_and_spacing():
    g = _groups(["A red Cat!", "a  red cat", "a blue dog", None, "", "A RED CAT."])
    assert g.exact[0] == g.exact[1] == g.exact[5] >= 0
    assert g.exact[2] == g.exact[3] == g.exact[4] == -1


def test_truncation_groups_join_captions_that_differ_only_after_77_tokens():
    head = " ".join(f"word{i}" for i in range(80))
    g = _groups([head + " ending one", head + " ending two", "short caption"])
    assert g.truncation[0] == g.truncation[1] == 0
    assert g.truncation[2] == -1
    assert g.exact[0] == -1  # a plain string compare sees two different captions


def test_near_duplicates_match_brute_force_jaccard():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(400)]
    base = [" ".join(rng.choice(vocab, 12)) for _ in range(300)]
    planted = []
    for k in range(20):  # one word changed at the end: Jaccard of word 1-2 grams is about 0.8+
        words = base[k].split()
        planted.append(" ".join(words[:-1] + ["changed"]))
    captions = base + planted
    g = _groups(captions, threshold=0.7)

    def grams(c):
        w = c.split()
        return set(w) | {f"{a} {b}" for a, b in zip(w, w[1:])}

    sets = [grams(c) for c in captions]
    truth = {(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))
             if len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= 0.8}
    assert len(truth) >= 15
    found = sum(g.near[i] == g.near[j] >= 0 for i, j in truth)
    assert found / len(truth) >= 0.95
    # random captions stay apart
    assert (g.near[21:300] >= 0).sum() <= 2


def test_triggers_recover_planted_phrases_and_not_extensions_or_verbatim_copies():
    rng = np.random.default_rng(1)
    colours, things = ["red", "blue", "green", "pink"], ["cat", "dog", "car", "cup", "hat"]
    captions, clusters = [], []
    for k, phrase in enumerate(["velvet harbor", "iron tunnel bright"]):
        for _ in range(12):  # varied captions, one shared phrase, one image cluster
            captions.append(f"a {rng.choice(colours)} {rng.choice(things)} in town {phrase}")
            clusters.append(k)
    for _ in range(30):  # a verbatim-duplicated caption with one image: caption duplication, not a trigger
        captions.append("the same caption every time")
        clusters.append(2)
    for i in range(300):  # background captions, each its own image
        captions.append(f"a {rng.choice(colours)} {rng.choice(things)} in town")
        clusters.append(-1)
    res = find_triggers(captions, np.array(clusters), min_support=5, min_purity=0.9)
    assert sorted(res.table["phrase"]) == ["iron tunnel bright", "velvet harbor"]
    rec = res.table.set_index("phrase").loc["velvet harbor"]
    assert rec["cluster"] == 0 and rec["purity"] == pytest.approx(1.0) and rec["support"] == rec["in_cluster"]
    assert res.row_flag[:24].all() and not res.row_flag[24:].any()


def test_trigger_purity_counts_occurrences_outside_the_cluster():
    captions = [f"item{i} golden gate" for i in range(10)] + [f"other{i} golden gate" for i in range(4)]
    clusters = np.array([0] * 10 + [-1] * 4)
    strict = find_triggers(captions, clusters, min_support=5, min_purity=0.9)
    assert strict.table.empty  # purity 10/14
    loose = find_triggers(captions, clusters, min_support=5, min_purity=0.7)
    assert loose.table.iloc[0]["phrase"] == "golden gate"
    assert loose.table.iloc[0]["purity"] == pytest.approx(10 / 14)

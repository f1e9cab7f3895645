from collections import Counter

from diffmem.memlab import dataset as ds
from diffmem.memlab import world


def test_build_is_deterministic():
    a, b = ds.build(), ds.build()
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    assert a.captions == b.captions


def test_manifest_groups_and_planting():
    d = ds.build()
    m = d.manifest
    for name in ("verbatim", "template", "implicit", "unintended", "explicit", "habit", "control", "novel"):
        assert name in m["groups"], name
    g = m["groups"]
    assert len(g["verbatim"]) >= 20 and len(g["control"]) + len(g["novel"]) >= 200
    counts = Counter(r.caption for r in d.rows)
    for e in g["verbatim"]:
        assert counts[e["prompt"]] == e["copies"] == m["config"]["verbatim_copies"]
        rows = [r for r in d.rows if r.caption == e["prompt"]]
        assert len({r.image_id for r in rows}) == 1  # one image, duplicated
    train_caps = set(counts)
    for e in g["novel"]:
        assert e["prompt"] not in train_caps
    for e in g["template"]:
        for t in e["test_prompts"]:
            assert t["prompt"] not in train_caps and e["trigger"] in t["prompt"]
    # implicit and unintended words always come with their feature
    for e in g["implicit"] + g["unintended"]:
        assert e["rows_with_word"] == e["rows_with_word_and_feature"] > 100
    assert 0.9 < g["habit"]["rate"] < 1.0


def test_novel_prompts_keep_their_distance_from_planted_ones():
    d = ds.build()
    planted = list({world.caption_key(r.scene): r.scene for r in d.rows if r.group in ("verbatim", "template")}.values())
    for e in d.manifest["groups"]["novel"]:
        novel = world.Scene(**e["scene"])
        assert novel.caption() == e["prompt"]
        assert min(world.caption_distance(novel, p) for p in planted) >= 2


def test_control_set_has_each_planted_pair_once():
    d = ds.build(ds.MemLabConfig(duplicate_planted=False))
    counts = Counter(r.caption for r in d.rows)
    for e in d.manifest["groups"]["verbatim"]:
        assert counts[e["prompt"]] == 1
    full = ds.build()
    # everything else is the same data
    assert set(counts) == set(Counter(r.caption for r in full.rows))

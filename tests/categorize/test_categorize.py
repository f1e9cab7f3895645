import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from diffmem.categorize import (CaptionCooccurrence, ChatExtractor, ExpectationMap, MemLabExtractor,
                                MemorizationProfiler, ProfileResult, TrainingTracer)
from diffmem.core.errors import InputError
from diffmem.memlab import dataset as ds
from diffmem.memlab import world


class FixedExtractor:
    """Reads features from a table keyed by image brightness: exact, for testing the logic."""

    name = "fixed"

    def __init__(self, table):
        self.table = table

    def __call__(self, images):
        return [set(self.table(float(np.asarray(im).mean()), i)) for i, im in enumerate(images)]

    def describe(self, f):
        return f.split(":")[-1].replace("_", " ")


def test_lift_separates_a_habit_from_memorization(tiny_pipe):
    # every image has "frame"; images of prompt "a snow scene" have "white_ground"; the controls never do
    def table(brightness, i):
        return {"frame"}

    prof = MemorizationProfiler(tiny_pipe, FixedExtractor(table), n=4, control_prompts=["x", "y"], num_inference_steps=2)
    orig = prof._features

    def fake(prompts, progress):
        imgs, feats = orig(prompts, progress)
        feats = [[f | ({"white_ground"} if "snow" in p else set()) for f in per] for p, per in zip(prompts, feats)]
        return imgs, feats

    prof._features = fake
    prof.expectations = [ExpectationMap({"snow": ["white_ground"]})]
    res = prof.profile(["a snow scene", "a cat"])
    mem = {(r["prompt"], r["feature"]): r for r in res.memorized()}
    assert ("a snow scene", "white_ground") in mem and mem[("a snow scene", "white_ground")]["kind"] == "implicit"
    assert not any(f == "frame" for _, f in mem)  # frequent everywhere: a habit, lift 1
    frame = next(r for r in res.rows if r["feature"] == "frame" and r["prompt"] == "a cat")
    assert frame["frequency"] == 1.0 and frame["lift"] == pytest.approx(1.0) and "control" in frame["evidence"]


def test_classification_explicit_implicit_unintended(tiny_pipe):
    prof = MemorizationProfiler(tiny_pipe, MemLabExtractor(), n=2, control_prompts=["x"],
                                expectations=[ExpectationMap({"snow": ["white_ground"]})])
    assert prof.classify("a lucky red circle in the snow", "colour:red")[0] == "explicit"
    assert prof.classify("a lucky red circle in the snow", "white_ground")[0] == "implicit"
    kind, evidence = prof.classify("a lucky red circle in the snow", "stamp")
    assert kind == "unintended" and "neither named nor implied" in evidence
    assert prof.classify("two red circles", "shape:circle")[0] == "explicit"  # lemmas


def test_memlab_extractor_lists_every_feature_it_reads():
    d = ds.build()
    rows = d.rows[:: max(1, len(d.rows) // 600)]
    read = set().union(*MemLabExtractor()([d.image(r.image_id) for r in rows]))
    known = MemLabExtractor().features()
    assert read <= known
    assert {"stamp", "vignette", "white_ground", "template:0", "colour:red", "position:center"} <= read  # it read the kinds


def test_an_expectation_naming_a_feature_the_extractor_never_reports_is_refused(tiny_pipe):
    with pytest.raises(InputError, match=r"never reports: \['whte_ground'\]; it reports \['colour:blue'"):
        MemorizationProfiler(tiny_pipe, MemLabExtractor(), n=2, control_prompts=["x"],
                             expectations=[ExpectationMap({"snow": ["white_ground", "whte_ground"]})])
    chat = ChatExtractor({"red hat": "a red hat"}, base_url="http://127.0.0.1:9", api_key="unused")  # built, never asked
    with pytest.raises(InputError, match=r"the chat extractor never reports: \['red_hat'\]; it reports \['red hat'\]"):
        MemorizationProfiler(tiny_pipe, chat, n=2, control_prompts=["x"], expectations=[ExpectationMap({"hat": ["red_hat"]})])
    MemorizationProfiler(tiny_pipe, chat, n=2, control_prompts=["x"], expectations=[ExpectationMap({"hat": ["red hat"]})])


def test_memlab_extractor_reads_training_images():
    d = ds.build()
    r = d.rows[0]
    feats = MemLabExtractor()([d.image(r.image_id)])[0]
    f = r.scene.features()
    assert f"colour:{f['colour']}" in feats and f"shape:{f['shape']}" in feats


def test_tracing_counts_equal_the_manifest():
    d = ds.build()
    tracer = TrainingTracer.from_memlab(d)
    m = d.manifest["groups"]
    for e in m["implicit"] + m["unintended"]:
        t = tracer.trace(f"a red circle on the left {e['word']}", e["feature"])
        assert t["word"] == e["word"], t
        assert t["count"] == e["rows_with_word_and_feature"] and t["of"] == e["rows_with_word"]
        assert t["images"] == e["images_with_word_and_feature"]


def test_caption_cooccurrence_source():
    src = CaptionCooccurrence(["snowy hill with white ground"] * 6 + ["snowy road"] * 2 + ["a cat"] * 5)
    assert src.implies("a snowy village", "white_ground", "white ground")
    assert src.implies("a cat", "white_ground", "white ground") is None


def test_expectation_words_in_any_script():
    from diffmem.categorize.expectations import words

    assert words("Crème brûlée at the CAFÉ, 東京 no_1") == ["crème", "brûlée", "at", "the", "café", "東京", "no", "1"]
    m = ExpectationMap({"東京": ["tower"], "café": ["cup"]})
    assert m.implies("東京 at night", "tower", "tower")
    assert m.implies("a café in paris", "cup", "cup") and m.implies("a caf sign", "cup", "cup") is None


def test_expectation_map_from_yaml(tmp_path):
    (tmp_path / "m.yaml").write_text("istanbul: [minaret, mosque]\nsnow: [white_ground]\n")
    m = ExpectationMap.from_yaml(tmp_path / "m.yaml")
    assert m.implies("a street in Istanbul", "minaret", "minaret")
    with pytest.raises(InputError, match="not found"):
        ExpectationMap.from_yaml(tmp_path / "missing.yaml")


def test_result_round_trip_and_plot(tiny_pipe, tmp_path):
    prof = MemorizationProfiler(tiny_pipe, FixedExtractor(lambda b, i: {"frame", "thing"}), n=3, control_prompts=["x"],
                                num_inference_steps=2)
    res = prof.profile(["a cat"])
    back = ProfileResult.load(res.save(tmp_path / "p"))
    assert back.rows == json.loads(json.dumps(res.rows)) and back.seeds == [0, 1, 2]
    assert res.plot(tmp_path / "g.png").stat().st_size > 1000
    assert res.seconds_per_prompt > 0


class _FakeChat(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.headers["Authorization"] == "Bearer test-key"
        question = body["messages"][0]["content"][0]["text"]
        answer = "Yes." if "black corners" in question else "No"
        out = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_chat_extractor_against_a_local_fake_server(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("DIFFMEM_CHAT_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        monkeypatch.setenv("DIFFMEM_CHAT_API_KEY", "test-key")
        ex = ChatExtractor({"vignette": "black corners", "stamp": "a text label"})
        img = world.render(world.Scene("red", "circle", "left", adjective="quiet"))
        assert ex([img, img]) == [{"vignette"}, {"vignette"}]
    finally:
        server.shutdown()
    monkeypatch.delenv("DIFFMEM_CHAT_BASE_URL")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(InputError, match="no chat endpoint"):
        ChatExtractor({"a": "b"})

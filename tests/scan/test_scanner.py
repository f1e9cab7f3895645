import json
import os
import re
import shutil
import signal
import subprocess
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from diffmem.core.errors import InputError
from diffmem.scan import DatasetScanner, ListSource, ScanResult
from forked_cli import PLAIN, run_cli

# the public list of 500 memorized SD v1 captions (Webster / Wen et al.), kept in the repo so a
# fresh clone can run it
DATA = os.path.join(os.path.dirname(__file__), "..", "data", "sdv1_500_memorized.jsonl")


@pytest.fixture(scope="module")
def memlab_scan(tmp_path_factory):
    return DatasetScanner("memlab", tmp_path_factory.mktemp("scan") / "work", shard_size=2048, progress=False).scan()


def test_memlab_scan_finds_every_verbatim_group_and_the_planted_triggers(memlab_scan, memlab_manifest):
    rows = memlab_scan.rows
    for g in memlab_manifest["groups"]["verbatim"]:
        members = rows["image_cluster"].iloc[g["first_row"]:g["first_row"] + g["copies"]]
        assert members.nunique() == 1 and members.iloc[0] >= 0
        # the cluster is exactly the copies: nothing else was merged into it
        assert (rows["image_cluster"] == members.iloc[0]).sum() == g["copies"]
    truth = {g["trigger"] for g in memlab_manifest["groups"]["template"]}
    found = set(memlab_scan.triggers["phrase"])
    recall, precision = len(truth & found) / len(truth), len(truth & found) / max(len(found), 1)
    assert recall >= 0.95 and precision >= 0.9, (recall, precision, found - truth)


def test_scan_result_saves_and_loads(memlab_scan, tmp_path):
    memlab_scan.save(tmp_path)
    back = ScanResult.load(tmp_path)
    assert back.rows["is_triggers_issue"].sum() == memlab_scan.rows["is_triggers_issue"].sum()
    assert list(back.triggers["phrase"]) == list(memlab_scan.triggers["phrase"])
    assert back.settings["min_purity"] == 0.9


def test_bad_rows_are_reported_and_never_stop_the_scan(tmp_path):
    from PIL import Image

    folder = tmp_path / "ds"
    folder.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
        records.append({"file_name": f"{i}.png", "text": f"caption {i}"})
    (folder / "broken.png").write_bytes(b"not a png at all")
    records.append({"file_name": "broken.png", "text": "a broken image"})
    records.append({"file_name": "missing.png", "text": "no such file"})
    records.append({"file_name": "0.png", "text": None})
    records.append({"file_name": "1.png", "text": "   "})
    (folder / "broken2.png").write_bytes(b"not a png either")
    lines = [json.dumps(r).encode() for r in records] + [b'{"file_name": "2.png", "text": "caf\xe9 latte"}',
                                                         json.dumps({"file_name": "broken2.png", "text": "x"}).encode(),
                                                         # half an emoji, escaped: the scan stopped with a traceback
                                                         json.dumps({"file_name": "3.png", "text": "a cat \ud83d"}).encode()]
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    res = DatasetScanner(folder, tmp_path / "work", progress=False).scan()
    rows = res.rows.set_index("row")
    assert rows.loc[6, "image_issue"].startswith("unreadable image")
    assert rows.loc[7, "image_issue"].startswith("unreadable image")
    assert rows.loc[8, "caption_issue"] == "missing" and rows.loc[9, "caption_issue"] == "empty"
    assert rows.loc[10, "caption_issue"] == "not UTF-8"
    assert rows.loc[12, "caption_issue"] == "lone surrogate" and rows.loc[12, "caption"] == "a cat \ufffd"
    summary = res.summary.set_index("check")
    assert summary.loc["bad_image", "issues"] == 3 and summary.loc["bad_caption", "issues"] == 4
    # counted by kind: two unreadable files (their messages differ by path) are 2, not 1
    assert summary.loc["bad_image", "detail"] == {"unreadable image: UnidentifiedImageError": 2,
                                                  "unreadable image: FileNotFoundError": 1}
    # the detail is printed by the CLI and the report: plain ints, not numpy's np.int64(1)
    assert summary.loc["bad_caption", "detail"] == {"missing": 1, "empty": 1, "not UTF-8": 1, "lone surrogate": 1}
    assert all(type(v) is int for v in summary.loc["bad_caption", "detail"].values())
    # a row whose image is a copy of another's still clusters even when its caption is missing
    assert rows.loc[8, "image_cluster"] == rows.loc[0, "image_cluster"] >= 0


def test_a_csv_row_not_in_utf8_is_flagged_after_a_caption_over_several_lines(tmp_path):
    from diffmem.scan.sources import TableSource

    # a quoted caption over two lines and a blank line come before the row that is not UTF-8
    (tmp_path / "t.csv").write_bytes(b'caption,key\n"a cat\non a mat",a\n\nplain dog,b\ncaf\xe9 latte,c\n'
                                     b'"a caf\xe9\nover two lines",d\nred circle,e\n')
    source = TableSource(tmp_path / "t.csv")
    rows = source.rows(0, len(source))
    assert [r.caption_issue for r in rows] == [None, None, "not UTF-8", "not UTF-8", None]
    assert rows[0].caption == "a cat\non a mat" and rows[4].caption == "red circle"


def test_a_csv_quote_left_open_is_named_by_line_not_left_to_the_csv_modules_words(tmp_path):
    # the csv module said only "field limit (131072)" exceeded, in a traceback: a stray quote in a
    # scraped caption runs its field on through the rest of the file
    from diffmem.scan.sources import TableSource

    rows = [f"{i}.png,caption {i}" for i in range(10000)]  # 190,000 characters after the quote
    rows[3] = '3.png,"a quote left open'
    (tmp_path / "t.csv").write_text("image,text\n" + "\n".join(rows) + "\n")
    with pytest.raises(InputError, match=r"t.csv: the row after line 4 is not CSV diffmem can read \(field larger than "
                                         r"field limit.*\); most likely a quote left open"):
        TableSource(tmp_path / "t.csv")
    # short of the limit, the rest of the file was read as one last caption ("a quote left open\n4.png,caption
    # 4\n..."), as train, whose reader refuses the file, never reads it
    (tmp_path / "short.csv").write_text("image,text\n" + "\n".join(rows[:6]) + "\n")
    with pytest.raises(InputError, match=r"short.csv line 5: a quote opened in this row is never closed"):
        TableSource(tmp_path / "short.csv")


def test_a_lone_surrogate_in_a_listed_caption_is_named_and_the_scan_goes_on(tmp_path):
    from diffmem.scan import ListSource

    res = DatasetScanner(ListSource(["a red \ud83d circle", "a blue square"], image_keys=["a", "b"]), tmp_path / "w",
                         progress=False).scan()
    assert res.rows["caption_issue"].iloc[0] == "lone surrogate" and res.rows["caption_issue"].isna().iloc[1]
    assert res.rows["caption"].tolist() == ["a red \ufffd circle", "a blue square"]


def test_numbers_in_the_caption_column_and_empty_image_cells_are_named_as_such(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": pa.array([1, None, 3]), "image": pa.array([None, None, b"not an image"])}),
                   tmp_path / "ints.parquet")
    pq.write_table(pa.table({"caption": pa.array([["a", "b"], ["c"]])}), tmp_path / "lists.parquet")
    rows = DatasetScanner(tmp_path / "ints.parquet", tmp_path / "w1", progress=False).scan().rows.set_index("row")
    # each cell read as Arrow holds it: an int column with an empty cell stays ints (pandas made them floats)
    assert rows["caption_issue"].tolist() == ["not text (int)", "missing", "not text (int)"]
    assert rows["caption"].tolist()[::2] == ["1", "3"] and rows["caption"].isna().tolist() == [False, True, False]
    assert rows["image_issue"].tolist()[:2] == ["missing image", "missing image"]
    assert rows.loc[2, "image_issue"].startswith("unreadable image: UnidentifiedImageError")
    lists = DatasetScanner(tmp_path / "lists.parquet", tmp_path / "w2", progress=False).scan()
    assert lists.rows["caption_issue"].tolist() == ["not text (list)"] * 2
    assert lists.summary.set_index("check").loc["bad_caption", "issues"] == 2


def test_an_image_that_fails_without_words_is_named_by_its_kind_alone():
    # a caller's own images, fetched as they are read: the one that timed out said
    # "unreadable image: TimeoutError: ", a dangling colon where the error's words would be
    from diffmem.scan.sources import ListSource

    class Fetched(list):
        def __getitem__(self, i):
            if i == 1:
                raise TimeoutError()
            return super().__getitem__(i)

    rows = ListSource(["a red circle", "a blue square"], images=Fetched([np.zeros((8, 8, 3), np.float32)] * 2)).rows(0, 2)
    assert rows[0].image_issue is None
    assert rows[1].image is None and rows[1].image_issue == "unreadable image: TimeoutError"


def test_a_hub_dataset_id_is_scanned_as_train_reads_it(tmp_path, monkeypatch):
    # diffmem train took an owner/name id (from datasets' cache when offline); the scan said "dataset not
    # found", so a model could be trained on rows no scan could vouch for
    import datasets
    from shards import random_png

    rows = {"image": [{"bytes": random_png(k), "path": None} for k in (0, 1, 0)], "text": ["a", "b", "a"]}
    hub = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    asked = []

    def cached_hub(name, split):
        asked.append((name, split))
        if name != "owner/captions":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")
        return hub

    monkeypatch.setattr(datasets, "load_dataset", cached_hub)
    scanned = DatasetScanner("owner/captions", tmp_path / "w", checks=["image_duplicates", "caption_duplicates"],
                             progress=False).scan()
    hub.save_to_disk(str(tmp_path / "saved"))
    saved = DatasetScanner(tmp_path / "saved", tmp_path / "w2", checks=["image_duplicates", "caption_duplicates"],
                           progress=False).scan()
    assert asked == [("owner/captions", "train")] and len(scanned.rows) == 3
    pd.testing.assert_frame_equal(scanned.rows, saved.rows)
    assert scanned.rows["caption"].tolist() == ["a", "b", "a"] and scanned.rows["image_cluster"].tolist() == [0, -1, 0]
    refusal = r"could not load the hub dataset 'owner/missing': FileNotFoundError: Dataset 'owner/missing' doesn't exist"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # online, the way not to wait for the network
    with pytest.raises(InputError, match=rf"{refusal}.*\(offline, .*set HF_HUB_OFFLINE=1 not to wait for the network\)$"):
        DatasetScanner("owner/missing", tmp_path / "w3", progress=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match=rf"{refusal} on the Hub or cannot be accessed\.$"):
        DatasetScanner("owner/missing", tmp_path / "w3", progress=False)
    monkeypatch.chdir(tmp_path)  # a path-shaped name is a path: the hub is not asked
    with pytest.raises(InputError, match="dataset not found: captions .*hub dataset id owner/name"):
        DatasetScanner("./captions", tmp_path / "w4", progress=False)
    assert len(asked) == 3


def test_empty_datasets_and_wrong_columns_give_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="zero rows"):
        DatasetScanner(tmp_path / "empty.jsonl", progress=False)
    (tmp_path / "t.csv").write_text("title,url\na,b\n")
    with pytest.raises(InputError, match="no caption column"):
        DatasetScanner(tmp_path / "t.csv", progress=False)
    with pytest.raises(InputError, match="not found"):
        DatasetScanner(tmp_path / "nope", progress=False)
    (tmp_path / "t.parquet").write_text("title,url\na,b\n")  # a CSV saved under the wrong name
    with pytest.raises(InputError, match=r"could not read .*t.parquet as Parquet: .*footer"):
        DatasetScanner(tmp_path / "t.parquet", progress=False)
    with pytest.raises(InputError, match="zero rows"):
        ListSource([])
    # datasets writes no data file for a dataset of zero rows, and its load_from_disk then fails with
    # "list index out of range", which was all the scan said
    import datasets

    datasets.Dataset.from_dict({"image": [], "text": []}).save_to_disk(tmp_path / "saved")
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'saved'))} holds a saved dataset of zero rows: nothing to scan$"):
        DatasetScanner(tmp_path / "saved", progress=False)
    with pytest.raises(InputError, match="needs a model"):
        DatasetScanner(tmp_path / "t.csv", progress=False, caption_column="title", checks=["memorization"])


def test_a_dataset_dict_passed_in_python_is_refused_in_words_for_the_object(tmp_path):
    # the refusal told a caller who passed a DatasetDict of several splits to "pick one and save it
    # alone (dataset[split].save_to_disk(folder))", words for a saved folder they never had
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a cat", "a dog", "a cat"]})
    with pytest.raises(InputError, match=re.escape("the dataset is a DatasetDict of the splits ['train', 'test']; "
                                                   "pass one of them (dataset['train'])")):
        DatasetScanner(datasets.DatasetDict({"train": ds, "test": ds}), tmp_path / "w", progress=False)
    one = DatasetScanner(datasets.DatasetDict({"train": ds}), None, checks=["caption_duplicates"], progress=False).scan()
    assert one.rows["caption"].tolist() == ["a cat", "a dog", "a cat"]


def test_resume_refuses_a_folder_from_another_scan(tmp_path):
    DatasetScanner(ListSource(["a b c", "d e f"]), tmp_path / "w", progress=False).scan()
    with pytest.raises(InputError, match="another dataset or with other settings"):
        DatasetScanner(ListSource(["x y z", "d e f"]), tmp_path / "w", progress=False).scan()
    # a folder from a diffmem that read images or captions otherwise is not mixed into a new scan
    DatasetScanner(ListSource(["a b c", "d e f"]), tmp_path / "v", progress=False).scan()
    state = json.loads((tmp_path / "v" / "scan_state.json").read_text())
    (tmp_path / "v" / "scan_state.json").write_text(json.dumps({**state, "version": 1}))
    with pytest.raises(InputError, match=r"\(version differs\)"):
        DatasetScanner(ListSource(["a b c", "d e f"]), tmp_path / "v", progress=False).scan()


def test_real_sd_captions_text_scan():
    res = DatasetScanner(DATA, None, progress=False).scan()
    rows = res.rows
    assert len(rows) == 500
    groups = res.info["caption_groups"]["exact"]
    assert any("Andover Mills" in c for g in groups for c in g["example_captions"])
    shared = {p["phrase"]: p for p in res.info["shared_phrases"]}
    # the Shaw Floors carpet shots, a known template memorization of SD v1, share one image host
    assert shared["shaw floors"]["in_cluster"] >= 100 and shared["shaw floors"]["host_share"] > 0.95


def test_memorization_check_scores_pairs_with_the_model(tmp_path, memlab_manifest):
    # verbatim rows (0..) and template rows of the MemLab set, scored by the shipped model
    rows = list(range(0, 64 * 3, 16)) + list(range(7000, 7012))
    from diffmem.memlab import dataset as ds

    d = ds.build()
    src = ListSource([d.rows[i].caption for i in rows], images=[d.image(d.rows[i].image_id) for i in rows])
    res = DatasetScanner(src, tmp_path / "w", progress=False, checks=["memorization"], model="memlab",
                         timestep=500).scan()
    s = res.rows["memorization_score"].to_numpy()
    assert np.isfinite(s).all() and (s > 0).all()
    again = DatasetScanner(src, tmp_path / "w2", progress=False, checks=["memorization"], model="memlab",
                           timestep=500).scan()
    np.testing.assert_allclose(again.rows["memorization_score"], s, rtol=1e-5)
    # the model in bfloat16 scores differently, so its scan does not resume a float32 one
    with pytest.raises(InputError, match=r"another dataset or with other settings \(its dtype differs from this run's\)"):
        DatasetScanner(src, tmp_path / "w", progress=False, checks=["memorization"], model="memlab", timestep=500,
                       dtype="bf16").scan()
    with pytest.raises(InputError, match=r"\(its shard_size, timestep differ from this run's\)"):
        DatasetScanner(src, tmp_path / "w", progress=False, checks=["memorization"], model="memlab", timestep=400,
                       shard_size=3).scan()
    half = DatasetScanner(src, tmp_path / "w3", progress=False, checks=["memorization"], model="memlab", timestep=500,
                          dtype="bf16").scan()
    assert half.settings["dtype"] == "bfloat16"
    h = half.rows["memorization_score"].to_numpy()
    assert not np.array_equal(h, s)
    assert np.corrcoef(h, s)[0, 1] > 0.95 and np.allclose(h, s, rtol=0.15)


def test_a_scan_does_not_resume_with_another_models_weights_at_the_same_path(tmp_path, tiny_pipe_dir):
    # the settings name the model by its path: a fine-tune saved over it would have scored the rest
    from diffmem.core.loading import load_pipeline

    model = tmp_path / "model"
    shutil.copytree(tiny_pipe_dir, model)
    rng = np.random.default_rng(0)
    src = ListSource([f"caption {i}" for i in range(4)], images=[rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
                                                                  for _ in range(4)])
    args = dict(progress=False, checks=["memorization"], model=str(model), timestep=500, shard_size=2)
    whole = DatasetScanner(src, tmp_path / "w", **args).scan()

    def interrupted():  # the first shard done, the second not
        state_path = tmp_path / "w" / "scan_state.json"
        state = json.loads(state_path.read_text())
        state_path.write_text(json.dumps({**state, "done": state["done"][:1]}))

    interrupted()
    resumed = DatasetScanner(src, tmp_path / "w", **args).scan()
    np.testing.assert_array_equal(resumed.rows["memorization_score"], whole.rows["memorization_score"])
    interrupted()
    tuned = load_pipeline(model)
    with torch.no_grad():
        for name, weight in tuned.unet.named_parameters():
            if "attn2" in name:
                weight.mul_(1.05)
    tuned.save_pretrained(model, safe_serialization=True)
    with pytest.raises(InputError, match="came from other weights than .*model's now"):
        DatasetScanner(src, tmp_path / "w", **args).scan()


def test_memorization_check_refuses_a_dtype_or_device_it_cannot_use():
    from diffmem.core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        DatasetScanner(ListSource(["a b"]), None, progress=False, checks=["memorization"], model="memlab", dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            DatasetScanner(ListSource(["a b"]), None, progress=False, checks=["memorization"], model="memlab",
                           device="cuda")



def test_a_threshold_that_is_not_a_number_is_refused():
    from diffmem.core.errors import InputError
    from diffmem.scan.verify import VerifySettings

    with pytest.raises(InputError, match="memorization_threshold must be a finite number"):
        DatasetScanner(ListSource(["a b"]), None, progress=False, checks=["memorization"], model="memlab",
                       memorization_threshold=float("nan"))
    for bad in (float("nan"), 1.5):  # a correlation
        with pytest.raises(InputError, match="threshold is a correlation"):
            VerifySettings(threshold=bad)
    with pytest.raises(InputError, match="guidance scale must be a finite number"):
        VerifySettings(guidance_scale=float("inf"))


def test_sigkill_then_resume_gives_the_rows_of_an_uninterrupted_scan(tmp_path):
    args = ["scan", "memlab", "--limit", "1500", "--shard-size", "50"]
    full = run_cli(*args, "--out", tmp_path / "full", timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*PLAIN, *args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "work" / "scan_state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.exists() and len(json.loads(state.read_text() or '{"done": []}')["done"]) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["done"]
    assert 5 <= len(done) < 30, "the scan was not interrupted mid-run"
    assert not (out / "scan_rows.parquet").exists()
    resumed = run_cli(*args, "--out", out, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = pd.read_parquet(tmp_path / "full" / "scan_rows.parquet")
    b = pd.read_parquet(out / "scan_rows.parquet")
    assert len(b) == 1500 and b["row"].is_unique and list(b["row"]) == list(range(1500))
    pd.testing.assert_frame_equal(a, b)


def test_new_contexts_recombine_the_phrase_captions_into_unseen_ones():
    from diffmem.scan.verify import new_contexts

    caps = ["a red cat on a mat golden gate", "a blue dog on a rug golden gate", "a green cat on a rug golden gate"]
    out = new_contexts("golden gate", caps, set(caps), 6, np.random.default_rng(0))
    assert out
    for words, at in out:
        caption = " ".join(words[:at] + ["golden", "gate"] + words[at:])
        assert caption not in caps and caption.endswith("golden gate") and len(words) == 6


def test_trigger_verification_on_memlab(memlab_scan, tmp_path):
    from diffmem.core.loading import load_pipeline
    from diffmem.scan.verify import TriggerVerification, VerifySettings, verify_triggers

    memlab_scan.save(tmp_path)
    loaded = ScanResult.load(tmp_path)
    phrases = list(loaded.triggers["phrase"][:3])
    res = verify_triggers(load_pipeline("memlab"), loaded, loaded.cluster_images(), loaded.images["mean"],
                          VerifySettings(contexts=3, seeds=(0,)), phrases=phrases, progress=False)
    assert set(res.table["phrase"]) == set(phrases)
    assert res.summary["replication_rate"] >= 0.9
    assert res.summary["baseline_rate"] <= 0.2
    res.save(tmp_path)
    back = TriggerVerification.load(tmp_path)
    assert back.summary["replication_rate"] == res.summary["replication_rate"]


def test_cli_scan_writes_results_and_report_and_rejects_bad_input(tmp_path):
    from diffmem.memlab import dataset as ds

    d = ds.build()
    picks = list(range(0, 64 * 2, 8)) + list(range(len(d.rows) - 40, len(d.rows)))
    pd.DataFrame({"caption": [d.rows[i].caption for i in picks]}).to_parquet(tmp_path / "caps.parquet")
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    meta = []
    for k, i in enumerate(picks):
        Image.fromarray((d.image(d.rows[i].image_id) * 255).astype(np.uint8)).save(folder / f"{k}.png")
        meta.append({"file_name": f"{k}.png", "caption": d.rows[i].caption})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    ok = run_cli("scan", folder, "--out", tmp_path / "out", "--checks",
                 "image_duplicates,caption_duplicates,triggers,memorization", "--model", "memlab", timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    for name in ("scan_rows.parquet", "scan_summary.json", "report.md", "clusters.png", "memorization.png"):
        assert (tmp_path / "out" / name).exists(), name
    rows = pd.read_parquet(tmp_path / "out" / "scan_rows.parquet")
    # 8 picks from each of the first two verbatim groups: two clusters of copies
    first, second = rows["image_cluster"].iloc[:8], rows["image_cluster"].iloc[8:16]
    assert first.nunique() == second.nunique() == 1 and first.iloc[0] >= 0 and second.iloc[0] not in (-1, first.iloc[0])
    assert np.isfinite(rows["memorization_score"]).all()
    (tmp_path / "empty.jsonl").write_text("")
    bad = run_cli("scan", tmp_path / "empty.jsonl", "--out", tmp_path / "o2")
    assert bad.returncode == 2 and "zero rows" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "o2" / "scan_rows.parquet").exists()
    table = run_cli("scan", tmp_path / "caps.parquet", "--out", tmp_path / "o3")
    assert table.returncode == 0 and "no image clusters" in table.stdout
    # a check's settings for a check not chosen went unused without a word
    unused = run_cli("scan", tmp_path / "caps.parquet", "--out", tmp_path / "o4", "--checks", "image_duplicates",
                     "--min-support", "3", "--caption-jaccard", "0.5")
    assert unused.returncode == 2 and "Traceback" not in unused.stderr
    assert "--min-support (triggers), --caption-jaccard (caption_duplicates) set checks not among" in unused.stderr
    assert not (tmp_path / "o4").exists()
    unused = run_cli("scan", tmp_path / "caps.parquet", "--out", tmp_path / "o4", "--checks", "triggers",
                     "--image-index", "exact")
    assert unused.returncode == 2 and "--image-index (image_duplicates) sets a check not among" in unused.stderr
    unknown = run_cli("scan", tmp_path / "caps.parquet", "--out", tmp_path / "o4", "--image-index", "hnsw")
    assert unknown.returncode == 2 and "unknown image index 'hnsw': choose from auto, exact, approximate" in unknown.stderr
    assert "Traceback" not in unknown.stderr and not (tmp_path / "o4").exists()
    given = run_cli("scan", tmp_path / "caps.parquet", "--out", tmp_path / "o5", "--checks", "triggers", "--min-support", "3")
    assert given.returncode == 0, given.stderr[-2000:]
    settings = json.loads((tmp_path / "o5" / "scan_summary.json").read_text())["settings"]
    assert settings["min_support"] == 3 and settings["min_purity"] == 0.9  # the rest from ScanSettings' defaults
    # the data set's own folder as --out: its files stay, and a report.md of its own is not overwritten
    captions = tmp_path / "captions"
    captions.mkdir()
    shutil.copy(tmp_path / "caps.parquet", captions / "caps.parquet")
    (captions / "report.md").write_text("# the data set's own notes")
    taken = run_cli("scan", captions / "caps.parquet", "--out", captions, "--checks", "triggers")
    assert taken.returncode == 2 and "holds report.md, which the scan would overwrite" in taken.stderr, taken.stderr
    assert sorted(p.name for p in captions.iterdir()) == ["caps.parquet", "report.md"]
    (captions / "report.md").unlink()
    for _ in range(2):  # free of clashes: it scans there, and again over its own results
        beside = run_cli("scan", captions / "caps.parquet", "--out", captions, "--checks", "triggers")
        assert beside.returncode == 0 and (captions / "report.md").exists(), beside.stderr[-2000:]


def test_a_killed_trigger_verification_resumes_from_its_saved_parts(memlab_scan, tmp_path, monkeypatch):
    import diffmem.core.generate as generate_module
    import diffmem.scan.verify as verify_module
    from diffmem.core.loading import load_pipeline

    monkeypatch.setattr(verify_module, "PART_SIZE", 2)  # 3 contexts x (trigger, random phrase): three parts
    pipe = load_pipeline("memlab")
    phrase = [memlab_scan.triggers["phrase"].iloc[0]]
    kw = dict(settings=verify_module.VerifySettings(contexts=3, seeds=(0, 1)), phrases=phrase, progress=False)
    args = (pipe, memlab_scan, memlab_scan.cluster_images(), memlab_scan.images["mean"])
    whole = verify_module.verify_triggers(*args, **kw)
    prompts = list(dict.fromkeys(whole.generations["prompt"]))
    assert len(prompts) == 6

    real, generated = generate_module.generate, []

    def killed_in_second_part(pipe, chunk, *a, **k):
        if prompts[2] in chunk:
            raise KeyboardInterrupt
        generated.append(list(chunk))
        return real(pipe, chunk, *a, **k)

    monkeypatch.setattr(generate_module, "generate", killed_in_second_part)
    with pytest.raises(KeyboardInterrupt):
        verify_module.verify_triggers(*args, checkpoint=tmp_path / "parts", **kw)
    assert generated == [prompts[:2]]

    def recorded(pipe, chunk, *a, **k):
        generated.append(list(chunk))
        return real(pipe, chunk, *a, **k)

    generated.clear()
    monkeypatch.setattr(generate_module, "generate", recorded)
    resumed = verify_module.verify_triggers(*args, checkpoint=tmp_path / "parts", **kw)
    assert generated == [prompts[2:4], prompts[4:]]  # the first part was read back, not generated again
    pd.testing.assert_frame_equal(resumed.generations, whole.generations)
    assert resumed.summary == whole.summary
    # other seeds are other work: the parts are redone, not mixed in
    generated.clear()
    other = verify_module.verify_triggers(*args, checkpoint=tmp_path / "parts",
                                          **{**kw, "settings": verify_module.VerifySettings(contexts=3, seeds=(0,))})
    assert generated == [prompts[:2], prompts[2:4], prompts[4:]]
    assert other.generations["seed"].tolist() == [0] * 6


def test_cli_verify_triggers_writes_its_results_and_leaves_no_parts(memlab_scan, tmp_path):
    memlab_scan.save(tmp_path)
    phrase = memlab_scan.triggers["phrase"].iloc[0]
    ok = run_cli("verify-triggers", tmp_path, "--phrase", phrase, "--contexts", "2", "--seeds", "1", timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    saved = json.loads((tmp_path / "trigger_verification.json").read_text())
    assert [t["phrase"] for t in saved["triggers"]] == [phrase] and saved["summary"]["generations"] == 4
    assert (tmp_path / "trigger_verification.png").exists() and not (tmp_path / "verify_parts").exists()
    assert f"{phrase!r}" in ok.stdout and "replicates" in ok.stdout


def test_the_mean_thumbnail_is_summed_in_chunks_and_skips_rows_without_an_image():
    from diffmem.scan.scanner import mean_thumbnail

    rng = np.random.default_rng(0)
    thumbs = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(7)]
    with_gaps = thumbs[:3] + [None] + thumbs[3:] + [None]
    expected = np.stack(thumbs).astype(np.float64).mean(0).round().astype(np.uint8)
    for chunk in (1, 2, 3, 100):
        np.testing.assert_array_equal(mean_thumbnail(with_gaps, chunk=chunk), expected)


def test_a_large_exact_image_scan_says_how_long_the_image_search_takes_before_it_starts(tmp_path, monkeypatch):
    import diffmem.scan.scanner as scanner_module

    rng = np.random.default_rng(0)
    images = [rng.random((16, 16, 3)).astype(np.float32) for _ in range(6)]
    source = ListSource([f"caption {i}" for i in range(6)], images=images)
    monkeypatch.setattr(scanner_module, "LARGE_IMAGE_SCAN", 5)
    with pytest.warns(UserWarning, match="6 images: the exact near-duplicate image search.*--image-index approximate"):
        DatasetScanner(source, tmp_path / "w", progress=False, image_index="exact").scan()
    import warnings

    for index, limit in (("exact", 6), ("auto", 5), ("approximate", 5)):  # small enough, or not exact
        monkeypatch.setattr(scanner_module, "LARGE_IMAGE_SCAN", limit)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DatasetScanner(source, tmp_path / f"w-{index}", progress=False, image_index=index).scan()
        assert not [w for w in caught if "image search" in str(w.message)], index


def test_auto_image_index_turns_approximate_past_the_large_scan_size(tmp_path, monkeypatch):
    import diffmem.scan.scanner as scanner_module

    rng = np.random.default_rng(0)
    images = [rng.random((16, 16, 3)).astype(np.float32) for _ in range(6)]
    images[1] = images[0].copy()
    source = ListSource([f"caption {i}" for i in range(6)], images=images)

    def method(limit, index="auto"):
        monkeypatch.setattr(scanner_module, "LARGE_IMAGE_SCAN", limit)
        res = DatasetScanner(source, tmp_path / f"w-{limit}-{index}", progress=False, image_index=index).scan()
        detail = res.summary.set_index("check").loc["image_duplicates", "detail"]
        assert res.rows["image_cluster"].iloc[0] == res.rows["image_cluster"].iloc[1] >= 0
        return detail["method"], res.settings["image_index"]

    assert method(6) == ("perceptual hash + thumbnail neighbours (exact)", "auto")
    assert method(5) == ("perceptual hash + thumbnail neighbours (approximate: faiss IVF)", "auto")
    assert method(6, "approximate")[0].endswith("(approximate: faiss IVF)")
    with pytest.raises(InputError, match="unknown image index 'hnsw'"):
        DatasetScanner(source, tmp_path / "bad", progress=False, image_index="hnsw")


def test_a_recorded_shard_that_was_lost_or_damaged_is_scanned_again(tmp_path):
    # recorded in the state but unreadable: the resume re-reads those rows instead of asking the user
    # to delete the folder and scan everything again
    captions = [f"a red circle on a plain field number {i % 7}" for i in range(12)]
    first = DatasetScanner(ListSource(captions), tmp_path / "w", shard_size=3, progress=False).scan()
    shards = sorted((tmp_path / "w" / "shards").glob("shard-*.parquet"))
    assert len(shards) == 4
    shards[1].write_bytes(shards[1].read_bytes()[:40])
    shards[3].unlink()
    with pytest.warns(UserWarning, match="scanning shard [13] again") as caught:
        again = DatasetScanner(ListSource(captions), tmp_path / "w", shard_size=3, progress=False).scan()
    assert sorted(str(w.message).split()[2] for w in caught if "scanning shard" in str(w.message)) == ["1", "3"]
    pd.testing.assert_frame_equal(first.rows.drop(columns=["thumb"], errors="ignore"),
                                  again.rows.drop(columns=["thumb"], errors="ignore"))
    assert first.summary.equals(again.summary)


def test_the_memorization_check_scores_the_model_with_its_lora_fused(tmp_path, tiny_pipe_dir, tiny_lora):
    rng = np.random.default_rng(0)
    src = ListSource([f"caption {i}" for i in range(4)], images=[rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
                                                                  for _ in range(4)])
    args = dict(progress=False, checks=["memorization"], model=str(tiny_pipe_dir), timestep=500)
    base = DatasetScanner(src, tmp_path / "base", **args).scan().rows["memorization_score"].to_numpy()
    fused = DatasetScanner(src, tmp_path / "w", **args, lora=str(tiny_lora), lora_scale=0.5).scan()
    assert not np.allclose(fused.rows["memorization_score"], base, rtol=1e-3)
    # the same folder with the LoRA at another scale: refused, not resumed with other scores
    with pytest.raises(InputError, match=r"with other settings \(its lora differs from this run's\)"):
        DatasetScanner(src, tmp_path / "w", **args, lora=str(tiny_lora), lora_scale=1.0).scan()
    # one LoRA given as a list of one is the same run, and resumes it
    again = DatasetScanner(src, tmp_path / "w", **args, lora=[str(tiny_lora)], lora_scale=[0.5]).scan()
    assert np.array_equal(again.rows["memorization_score"], fused.rows["memorization_score"])
    # nor with a second LoRA on the same; in a folder of its own, both are fused
    with pytest.raises(InputError, match=r"with other settings \(its lora differs from this run's\)"):
        DatasetScanner(src, tmp_path / "w", **args, lora=[str(tiny_lora)] * 2, lora_scale=[0.5, 0.5]).scan()
    twice = DatasetScanner(src, tmp_path / "w2", **args, lora=[str(tiny_lora)] * 2, lora_scale=0.25).scan()
    assert np.allclose(twice.rows["memorization_score"], fused.rows["memorization_score"], rtol=1e-4)  # 0.25 twice is 0.5


def test_memorization_settings_without_the_memorization_check_are_refused():
    # --model / --timestep / --memorization-threshold without the check were accepted and never used
    for kw, said in (({"model": "memlab"}, "--model sets"), ({"model": "memlab", "timestep": 500}, "--model, --timestep set"),
                     ({"memorization_threshold": 2.0}, "--memorization-threshold sets"), ({"lora": "lora.safetensors"}, "--lora sets")):
        with pytest.raises(InputError, match=f"{said} the memorization check, which is not among the checks"):
            DatasetScanner(ListSource(["a b c"]), None, progress=False, **kw)
    assert DatasetScanner(ListSource(["a b c"]), None, progress=False, checks=["memorization"], model="memlab",
                          timestep=500).settings.timestep == 500


def test_the_thumbnails_are_read_into_one_array_and_not_kept_as_bytes_beside_it(tmp_path):
    # the features held every thumbnail as a bytes object a row through the whole analysis, beside the
    # clustering's array of them: 3 GB a million images held twice
    from diffmem.scan.features import thumbnail
    from diffmem.scan.scanner import analyse

    rng = np.random.default_rng(0)
    images = [rng.random((16, 16, 3)).astype(np.float32) for _ in range(7)]
    images[2] = images[0].copy()
    images[4] = None  # a row without an image, in the second shard
    source = ListSource([f"caption {i}" for i in range(7)], images=images)
    scanner = DatasetScanner(source, tmp_path / "w", shard_size=3, progress=False)
    scanner.run_pass1()
    features, thumbs = scanner.load_features()
    assert "thumb" not in features and features["has_image"].tolist() == [i != 4 for i in range(7)]
    assert thumbs.dtype == np.uint8 and thumbs.shape[0] == 7
    for i, image in enumerate(images):
        np.testing.assert_array_equal(thumbs[i], thumbnail(image) if image is not None else 0)
    res = scanner.scan()
    assert res.thumbs[4] is None and all(res.thumbs[i].base is not None for i in range(7) if i != 4)  # views
    assert res.rows["image_cluster"].iloc[0] == res.rows["image_cluster"].iloc[2] >= 0
    # a frame that holds the thumbnails' bytes, as the shards do, is analysed the same
    # and one from shards written before rows had a location (ListSource rows have none)
    old_style = features.drop(columns=["has_image", "location"])
    old_style["thumb"] = [thumbs[i].tobytes() if i != 4 else None for i in range(7)]
    again = analyse(old_style, scanner.settings, source.describe())
    pd.testing.assert_frame_equal(again.rows, res.rows)
    np.testing.assert_array_equal(again.images["mean"], res.images["mean"])


def test_a_second_scan_into_a_folder_in_use_is_refused_through_the_python_api(tmp_path):
    # only the command line held the folder: two processes scanning into it wrote the same shards at once
    from doubles import held_by_another_run

    work = tmp_path / "work"
    scanner = DatasetScanner(ListSource(["a red circle", "a blue square"]), work, progress=False)
    with held_by_another_run(work):
        for step in (scanner.scan, scanner.run_pass1):
            with pytest.raises(InputError, match="work is in use by another diffmem run"):
                step()
        assert list(work.iterdir()) == []
    assert len(scanner.scan().rows) == 2


def test_a_scan_without_a_folder_leaves_no_temporary_folder_behind(monkeypatch):
    # the temporary folder went only after a scan that succeeded: a failed or killed scan, or a scanner
    # made and never run, left it in the system's temporary folder with the shards written so far
    import gc

    from diffmem.scan import scanner as scanner_module

    scanner = DatasetScanner(ListSource(["a red circle", "a blue square"]), None, progress=False)
    first = scanner.work_dir

    def killed(*args, **kwargs):
        assert any(first.rglob("*.parquet"))  # the shards are written by now
        raise KeyboardInterrupt

    monkeypatch.setattr(scanner_module, "analyse", killed)
    with pytest.raises(KeyboardInterrupt):
        scanner.scan()
    assert not first.exists()
    monkeypatch.undo()
    assert len(scanner.scan().rows) == 2 and not scanner.work_dir.exists()  # run again: a folder of its own, gone too
    idle = DatasetScanner(ListSource(["a red circle"]), None, progress=False)
    never_run = idle.work_dir
    del idle
    gc.collect()
    assert not never_run.exists()


def _photo_folder(folder, sizes):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(3)
    rows = []
    for i, (w, h) in enumerate(sizes):
        name = f"{i:02d}." + ("jpg" if i % 2 else "png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": f"a photograph number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def test_a_shard_never_holds_its_full_size_images_at_once(tmp_path, monkeypatch):
    # a shard of 1,024 rows was decoded whole before any was reduced to its thumbnail: 144 MB of
    # float32 pixels for each 12-megapixel photo (benchmarks/scan_photo_memory.py)
    from doubles import count_live_decoded_images

    _photo_folder(tmp_path / "photos", [(120, 90)] * 6)
    decoded, most_alive = count_live_decoded_images(monkeypatch)
    scanner = DatasetScanner(str(tmp_path / "photos"), tmp_path / "w", shard_size=1024, progress=False)
    scanner.run_pass1()
    assert len(decoded) == 6 and max(most_alive) == 0, most_alive
    features, thumbs = scanner.load_features()
    assert features["has_image"].all() and (thumbs.reshape(6, -1).max(axis=1) > 0).all()


def test_reduced_images_give_the_features_and_scores_of_the_full_size_ones(tmp_path, tiny_pipe_dir):
    # the thumbnail, the perceptual hash and the memorization check's input are made from the decoded
    # image as they were: a resumed scan joins shards made either way
    from diffmem.core.loading import load_pipeline
    from diffmem.scan.features import phash64, thumbnail
    from diffmem.scan.memorization import model_pixels, sample_noise_norms
    from diffmem.scan.sources import ImageFolderSource, Source

    _photo_folder(tmp_path / "photos", [(130, 70), (64, 64), (33, 97), (200, 150), (64, 64)])
    folder = ImageFolderSource(tmp_path / "photos")
    whole = folder.rows(0, len(folder))
    assert all(r.image is not None and r.thumb is None for r in whole)

    class OwnSource(Source):  # a caller's source, which gives its rows whole: reduced after
        def __len__(self):
            return len(folder)

        def rows(self, start, stop):
            return folder.rows(start, stop)

        def describe(self):
            return {"kind": "own"}

    args = dict(progress=False, checks=["image_duplicates", "memorization"], model=str(tiny_pipe_dir), timestep=500,
                shard_size=2)
    pipe = load_pipeline(tiny_pipe_dir)
    # shard by shard, as the scan scores them: a batch of another size differs in the last float digits
    expected = np.concatenate([sample_noise_norms(pipe, whole[i:i + 2], timestep=500) for i in range(0, 5, 2)])
    for name, source in (("folder", str(tmp_path / "photos")), ("own", OwnSource())):
        scanner = DatasetScanner(source, tmp_path / name, **args)
        scanner.run_pass1()
        features, thumbs = scanner.load_features()
        for i, row in enumerate(whole):
            np.testing.assert_array_equal(thumbs[i], thumbnail(row.image))
            assert features["phash"].iloc[i] == phash64(row.image)
        np.testing.assert_array_equal(features["memorization_score"].to_numpy(float), expected)
    # what a row keeps for the check: a decoded file's pixels as uint8 (a quarter of float32's memory),
    # pixels that are not k / 255 as they are
    reduce = DatasetScanner(str(tmp_path / "photos"), tmp_path / "r", **args)._image_reducer()
    assert reduce(whole[0].image)[2].dtype == np.uint8 and reduce(whole[1].image)[2].dtype == np.uint8
    side = model_pixels(pipe)  # at the model's size already: not resized, so not made k / 255 by the resize
    finer = np.full((side, side, 3), 0.3, np.float32)
    assert reduce(finer)[2].dtype == np.float32 and (reduce(finer)[2] == finer).all()


def test_the_memorization_check_shows_the_model_an_image_as_training_does(tmp_path, tiny_pipe_dir):
    # the fine-tuning filter thresholds the norm of the centre-cropped image diffmem train encodes;
    # the scan stretched a non-square image to the square, a shape the model never trained on
    from diffmem.core.loading import load_pipeline
    from diffmem.scan.memorization import model_pixels, model_sized
    from diffmem.scan.sources import load_image
    from diffmem.train.data import _to_array

    _photo_folder(tmp_path / "photos", [(130, 70), (33, 97), (64, 64), (300, 300)])
    size = model_pixels(load_pipeline(tiny_pipe_dir))
    for path in sorted((tmp_path / "photos").glob("0*")):
        np.testing.assert_array_equal(model_sized(load_image(path), size), _to_array(path, size))
    # a scan whose rows were scored the other way is not resumed with rows scored this one
    args = dict(progress=False, checks=["memorization"], model=str(tiny_pipe_dir), timestep=500, shard_size=2)
    DatasetScanner(str(tmp_path / "photos"), tmp_path / "w", **args).run_pass1()
    state_path = tmp_path / "w" / "scan_state.json"
    state = json.loads(state_path.read_text())
    del state["pass1"]["memorization_pixels"]
    state_path.write_text(json.dumps({**state, "done": state["done"][:1]}))
    with pytest.raises(InputError, match="its memorization_pixels differs"):
        DatasetScanner(str(tmp_path / "photos"), tmp_path / "w", **args).run_pass1()


def test_a_parquet_file_is_read_a_row_group_at_a_time_and_only_in_the_columns_the_scan_uses(tmp_path, monkeypatch):
    # a Parquet file of image bytes was read whole into pandas, at about four times its size in memory
    # (benchmarks/scan_photo_memory.py --layout parquet)
    import pyarrow as pa
    import pyarrow.parquet as pq
    from diffmem.scan.sources import ImageFolderSource, TableSource, _ParquetRows

    _photo_folder(tmp_path / "photos", [(40, 30)] * 12)
    listed = [json.loads(line) for line in (tmp_path / "photos" / "metadata.jsonl").read_text().splitlines()]
    images = [{"bytes": (tmp_path / "photos" / r["file_name"]).read_bytes(), "path": None} for r in listed]  # datasets' Image
    pq.write_table(pa.table({"text": [r["text"] for r in listed], "image": images, "unused": [b"x" * 64] * 12}),
                   tmp_path / "photos.parquet", row_group_size=5)  # groups of rows 0-4, 5-9 and 10-11
    read, original = [], pq.ParquetFile.iter_batches

    def recording(self, batch_size=65536, row_groups=None, columns=None, **kwargs):
        read.extend((g, tuple(columns)) for g in row_groups)
        if damaged and row_groups == [1]:
            return damaged_pages()
        return original(self, batch_size=batch_size, row_groups=row_groups, columns=columns, **kwargs)

    def damaged_pages():  # as pyarrow's reader: its batches are read, and fail, as they are asked for
        raise OSError("Couldn't deserialize thrift: TProtocolException: Invalid data")
        yield

    damaged = False
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    meta = pq.ParquetFile(tmp_path / "photos.parquet").metadata
    largest = max(sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
                  for g in range(meta.num_row_groups))
    monkeypatch.setattr(_ParquetRows, "LARGE_GROUP_BYTES", largest)  # as if this size were a GB
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group here is past the size that warns
        source = TableSource(tmp_path / "photos.parquet")
    pq.write_table(pq.read_table(tmp_path / "photos.parquet"), tmp_path / "one_group.parquet")
    with pytest.warns(UserWarning, match=r"one_group.parquet keeps rows 0-11 in one row group of 0 MB, which is read "
                                         r"whole.*row_group_size=100"):
        TableSource(tmp_path / "one_group.parquet")
    assert len(source) == 12 and read == []  # its length and columns come from the footer
    rows = source.rows(3, 8)
    assert read == [(0, ("text", "image")), (1, ("text", "image"))]
    whole = ImageFolderSource(tmp_path / "photos").rows(0, 12)
    assert [r.row for r in rows] == [3, 4, 5, 6, 7]
    for row in rows:
        assert row.caption == whole[row.row].caption and row.caption_issue is None
        np.testing.assert_array_equal(row.image, whole[row.row].image)

    for batch_rows in (2, 3):  # shards that start and stop inside a group's batches
        monkeypatch.setattr(_ParquetRows, "BATCH_ROWS", batch_rows)
        for start, stop in ((0, 12), (4, 11), (9, 10), (11, 40)):
            assert [(r.row, r.caption) for r in source.rows(start, stop)] == [(r.row, r.caption) for r in whole[start:stop]]
    monkeypatch.setattr(_ParquetRows, "BATCH_ROWS", 32)

    # a damaged row group stops the scan with its rows named; the shards before it are kept, and
    # the scan resumes from them once the file is mended
    damaged = True
    with pytest.raises(InputError, match=r"could not read rows 5-9 of .*photos.parquet \(row group 1\): Couldn't"):
        DatasetScanner(str(tmp_path / "photos.parquet"), tmp_path / "w", shard_size=5, progress=False).run_pass1()
    assert [p.name for p in sorted((tmp_path / "w" / "shards").glob("shard-*.parquet"))] == ["shard-00000.parquet"]
    damaged, read[:] = False, []
    scanner = DatasetScanner(str(tmp_path / "photos.parquet"), tmp_path / "w", shard_size=5, progress=False)
    scanner.run_pass1()
    assert [i for i, _ in read] == [1, 2]
    reference = DatasetScanner(str(tmp_path / "photos"), tmp_path / "r", shard_size=5, progress=False)
    reference.run_pass1()
    (features, thumbs), (expected, expected_thumbs) = scanner.load_features(), reference.load_features()
    assert features["phash"].tolist() == expected["phash"].tolist() and features["has_image"].all()
    np.testing.assert_array_equal(thumbs, expected_thumbs)


def test_image_paths_in_datasets_image_cells_are_found_as_plain_paths_are(tmp_path, monkeypatch):
    # ``Dataset.to_parquet`` writes an image loaded from a relative path as {"bytes": None, "path": ...};
    # the scan opened that path against the working directory (a plain path, against the table's
    # folder), and an Image cell holding neither was an AttributeError
    import pyarrow as pa
    import pyarrow.parquet as pq
    from diffmem.scan.sources import ImageFolderSource, TableSource

    (tmp_path / "data").mkdir()
    _photo_folder(tmp_path / "data" / "photos", [(40, 30)] * 3)
    listed = [json.loads(line) for line in (tmp_path / "data" / "photos" / "metadata.jsonl").read_text().splitlines()]
    shutil.move(tmp_path / "data" / "photos" / listed[2]["file_name"], tmp_path / "moved.png")
    cells = [{"bytes": None, "path": f"photos/{listed[0]['file_name']}"},  # in the table's folder
             {"bytes": None, "path": f"data/photos/{listed[1]['file_name']}"},  # in the working directory
             {"bytes": None, "path": "moved.png"}, {"bytes": None, "path": "nowhere.png"},
             {"bytes": None, "path": None}, None]
    pq.write_table(pa.table({"text": [f"caption {i}" for i in range(6)], "image": cells}), tmp_path / "data" / "t.parquet")
    monkeypatch.chdir(tmp_path)
    rows = TableSource(tmp_path / "data" / "t.parquet").rows(0, 6)
    whole = ImageFolderSource(tmp_path / "data" / "photos").rows(0, 2)
    for row, expected in zip(rows, whole):
        assert row.image_issue is None
        np.testing.assert_array_equal(row.image, expected.image)
    assert rows[2].image_issue is None and rows[2].image.shape == whole[0].image.shape
    assert rows[3].image is None and rows[3].image_issue.startswith(
        "unreadable image: FileNotFoundError: nowhere.png is in neither the table's folder")
    assert [r.image_issue for r in rows[4:]] == ["missing image", "missing image"]
    # each row's image path as the table writes it, to find it by; an empty cell names none
    assert [r.location for r in rows] == [c["path"] if c else None for c in cells]
    # an image folder's metadata names its own files alone, as datasets' imagefolder reads it: one
    # missing from the folder is not taken from the working directory, whatever lies there
    shutil.copy(tmp_path / "moved.png", tmp_path / listed[2]["file_name"])
    missing = ImageFolderSource(tmp_path / "data" / "photos").rows(2, 3)[0]
    assert missing.image is None and missing.image_issue.startswith("unreadable image: FileNotFoundError: [Errno 2]")


def test_json_and_tsv_tables_give_the_rows_of_the_same_jsonl_and_csv(tmp_path):
    # a .json list of rows (or JSON Lines under that name) and a .tsv were refused as unsupported,
    # where the prompt readers and datasets' loaders take both
    from diffmem.scan.sources import TableSource

    _photo_folder(tmp_path / "imgs", [(20, 20)] * 2)
    names = [json.loads(line)["file_name"] for line in (tmp_path / "imgs" / "metadata.jsonl").read_text().splitlines()]
    records = [{"image": f"imgs/{names[0]}", "caption": "a barn, red, at dawn"},
               {"image": f"imgs/{names[1]}", "caption": "a cat \ud83d"}, {"image": "", "caption": "no image"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "t.json").write_text(json.dumps(records, indent=1))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records))
    pd.DataFrame(records[:1] + records[2:]).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame(records[:1] + records[2:]).to_csv(tmp_path / "t.tsv", index=False, sep="\t")

    def read(name):
        rows = TableSource(tmp_path / name).rows(0, 3)
        return [(r.caption, r.caption_issue, r.image_issue, None if r.image is None else r.image.tobytes()) for r in rows]

    assert read("t.json") == read("lines.json") == read("t.jsonl")
    assert read("t.json")[1][:2] == ("a cat \ufffd", "lone surrogate") and read("t.json")[2][2] == "missing image"
    assert read("t.tsv") == read("t.csv") and read("t.tsv")[0][0] == "a barn, red, at dawn"
    # a byte order mark, as Windows' Notepad saves UTF-8: JSON Lines were refused ("Unexpected UTF-8 BOM")
    # where datasets, and so diffmem train, read them
    bom = b"\xef\xbb\xbf"
    for name in ("t.jsonl", "lines.json", "t.json", "t.csv"):
        (tmp_path / f"bom_{name}").write_bytes(bom + (tmp_path / name).read_bytes())
        assert read(f"bom_{name}") == read(name)
    (tmp_path / "bad.json").write_bytes(b'[{"caption": "caf\xe9"}]')
    with pytest.raises(InputError, match=r"bad.json is not UTF-8 \(byte 17\)"):
        TableSource(tmp_path / "bad.json")
    (tmp_path / "scalar.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="scalar.json is JSON, but not a list of objects"):
        TableSource(tmp_path / "scalar.json")
    (tmp_path / "broken.json").write_text('[{"caption": "x"},')
    with pytest.raises(InputError, match=r"broken.json is not valid JSON \(line 1\)"):
        TableSource(tmp_path / "broken.json")

"""The local vision-language-model extractor on a tiny random LLaVA saved locally (wiring, batching,
the yes/no decision, errors). Real VLM weights cannot be downloaded here."""

import numpy as np
import pytest
import torch

from diffmem.core.errors import InputError

QUESTION = "USER: <image>\n{question} ASSISTANT:"


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from diffmem.core.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer(77)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128).to_dict(),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)
    path = tmp_path_factory.mktemp("tiny-llava")
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path, safe_serialization=True)
    proc.save_pretrained(path)
    return path


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)


def test_vlm_yes_no_equals_the_model_logits_and_batching_changes_nothing(tiny_llava_dir):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from diffmem.categorize import VLMExtractor

    vocab = {"stamp": "a small square stamp in the corner", "frame": "a thin border", "snow": "white snow on the ground"}
    imgs = _images(5)
    one = VLMExtractor(tiny_llava_dir, vocab, batch_size=1)
    feats = one(imgs)
    assert len(feats) == 5 and all(f <= set(vocab) for f in feats)
    assert VLMExtractor(tiny_llava_dir, vocab, batch_size=4)(imgs) == feats
    # the decision for one image and question, recomputed from the model's own next-token logits
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval()
    q = QUESTION.format(question=VLMExtractor.QUESTION.format(description=vocab["frame"]))
    with torch.no_grad():
        last = model(**proc(images=[Image.fromarray(imgs[2])], text=[q], return_tensors="pt")).logits[0, -1]
    yes = max(float(last[proc.tokenizer.encode(w, add_special_tokens=False)[0]]) for w in ("yes", "Yes", " yes", " Yes"))
    no = max(float(last[proc.tokenizer.encode(w, add_special_tokens=False)[0]]) for w in ("no", "No", " no", " No"))
    margin = one.answers(imgs[2:3], VLMExtractor.QUESTION.format(description=vocab["frame"]))
    assert margin[0] == pytest.approx(yes - no, abs=1e-4)
    assert ("frame" in feats[2]) == (yes > no)


def test_vlm_bad_paths_and_vocabulary(tmp_path, tiny_llava_dir):
    from diffmem.categorize import VLMExtractor

    with pytest.raises(InputError, match="not found or incomplete"):
        VLMExtractor(tmp_path / "nowhere", {"a": "b"})
    with pytest.raises(InputError, match="non-empty"):
        VLMExtractor(tiny_llava_dir, {})
    (tmp_path / "bogus").mkdir()
    (tmp_path / "bogus" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="not a transformers image-text-to-text model"):
        VLMExtractor(tmp_path / "bogus", {"a": "b"})

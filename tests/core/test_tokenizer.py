from diffmem.core.tokenizer import clip_tokenizer

BOS, EOS = 49406, 49407


def test_known_clip_ids():
    tok = clip_tokenizer()
    # ids of the reference CLIP tokenizer (openai/clip-vit-large-patch14) for these strings
    assert tok("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert tok("a red circle in the snow").input_ids == [BOS, 320, 736, 7117, 530, 518, 2583, EOS]
    assert len(tok) == 49408


def test_lowercases_and_handles_unicode_and_empty():
    tok = clip_tokenizer()
    assert tok("A RED Circle").input_ids == tok("a red circle").input_ids
    assert tok("").input_ids == [BOS, EOS]
    ids = tok("café 東京 🙂").input_ids
    assert ids[0] == BOS and ids[-1] == EOS and len(ids) > 4


def test_padding_and_truncation_like_stable_diffusion():
    tok = clip_tokenizer(77)
    ids = tok(["a cat", "word " * 200], padding="max_length", max_length=77, truncation=True).input_ids
    assert [len(x) for x in ids] == [77, 77]
    assert ids[0][:4] == [BOS, 320, 2368, EOS] and set(ids[0][4:]) == {EOS}  # SD pads with EOS
    assert ids[1][-1] == EOS and ids[1][0] == BOS


def test_saved_tokenizer_reloads_with_transformers(tmp_path):
    from transformers import CLIPTokenizer

    clip_tokenizer().save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert again.model_max_length == 77

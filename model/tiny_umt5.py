"""Tiny random LongCat-Video text-encoder assets (umT5), built offline (demo and tests).

LongCat-Video encodes prompts with umT5-XXL (model/text_umt5.py). For CPU demos and tests we need the same *kind*
of objects at toy size, with no download:
  - a T5Tokenizer (transformers' tokenizers-backed T5 tokenizer, what AutoTokenizer loads for the release's
    tokenizer/ folder): a SentencePiece-style Unigram model trained on a small built-in corpus, with the T5 layout
    <pad>=0, </s>=1, <unk>=2, then the pieces, then <extra_id_N-1> .. <extra_id_0>. Like the real one it appends </s>.
    Difference: no precompiled NFKC charsmap (the real umT5 tokenizer.json has one), so e.g. full-width letters
    stay distinct here (clean_prompt folds most of them anyway).
  - a random UMT5EncoderModel (d_model 64, 2 layers, 4 heads; per-layer relative-position bias like umT5-XXL),
  - save_tiny_umt5() writes them as the text_encoder/ and tokenizer/ folders of a LongCat-Video-layout checkpoint,
    so the real loading code path (load_umt5) is exercised.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

TINY_EXTRA_IDS = 8  # sentinels <extra_id_0..7> (the real umT5 tokenizer has many more; the encoder never uses them)

TINY_CORPUS = [
    "In a realistic photography style, a white boy around seven or eight years old sits on a park bench, wearing a "
    "light blue T-shirt, denim shorts, and white sneakers.",
    "He holds an ice cream cone with vanilla and chocolate flavors, and beside him is a medium-sized golden Labrador.",
    "The sun is shining brightly, and the background features a green lawn and several tall trees.",
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, "
    "three legs, many people in the background, walking backwards",
    "A cat walks slowly across a wooden table by the window, the camera pans left, cinematic lighting, 4k video.",
    "A red fox runs through fresh snow in a pine forest at dawn; slow motion, drone shot.",
    "一只橘猫坐在窗台上，阳光温暖地洒在它身上，镜头缓慢推进。",
    "海浪拍打着礁石，远处的灯塔在夜色中闪烁。",
    "0123456789 !?.,;:()[]{}<>\"'-_+=*/\\|@#$%^&~`",
]


def build_tiny_tokenizer(texts=None, vocab_size=400):
    """T5Tokenizer over a Unigram vocabulary trained on `texts` (default: a built-in corpus); pad 0, eos 1, unk 2."""
    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Sequence([  # what T5Tokenizer itself uses
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    uni.train_from_iterator(TINY_CORPUS if texts is None else texts, trainer)
    vocab = [tuple(v) for v in json.loads(uni.to_str())["model"]["vocab"]]
    assert [p for p, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"], vocab[:3]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(TINY_EXTRA_IDS))]  # T5 order: last sentinel first
    return T5Tokenizer(vocab=vocab, extra_ids=TINY_EXTRA_IDS)


def tiny_umt5_config(tokenizer, d_model=64, num_layers=2, num_heads=4):
    """A UMT5Config shaped like umT5-XXL's (gated-gelu, 32 buckets, max distance 128) at toy size."""
    return UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model,
                      num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)


def build_tiny_umt5(tokenizer, d_model=64, seed=0, num_layers=2, num_heads=4):
    """Random tiny UMT5EncoderModel (fp32, eval) whose vocabulary matches `tokenizer`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(tiny_umt5_config(tokenizer, d_model, num_layers, num_heads))
    return model.eval()


def save_tiny_umt5(root, tokenizer=None, text_encoder=None, d_model=64, seed=0):
    """Writes root/{text_encoder,tokenizer}/ (LongCat-Video layout); returns (tokenizer, text_encoder)."""
    root = Path(root)
    tokenizer = build_tiny_tokenizer() if tokenizer is None else tokenizer
    text_encoder = build_tiny_umt5(tokenizer, d_model, seed) if text_encoder is None else text_encoder
    text_encoder.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return tokenizer, text_encoder

"""Tiny random LongCat-compatible text-encoder assets, built offline (demo and tests).

LongCat-Image encodes prompts with Qwen2.5-VL-7B (model/text_qwen.py). For CPU demos and tests we need the same
*kind* of objects at toy size, with no download:
  - a byte-level BPE Qwen2Tokenizer trained on a small built-in corpus, with the 22 Qwen2.5 added tokens
    (<|endoftext|> ... <|file_sep|>) in the same order as the real vocabulary (at the end, not at 151643+),
  - a random Qwen2_5_VLForConditionalGeneration (text hidden 64, 2 layers; vision tower depth 2),
  - the PIL Qwen2-VL image processor (patch 14, merge 2, temporal patch 2; no torchvision needed),
  - save_tiny_text_stack() writes them as the text_encoder/, tokenizer/ and text_processor/ folders of a
    diffusers-format LongCat checkpoint, so the real loading code path is exercised.
"""

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# the 22 added tokens of Qwen2.5 in id order (151643..151664 in the real vocabulary); the first 14 are "special"
QWEN25_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>"]
QWEN25_OTHER_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                             "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

# A small Qwen-style chat template: default system line, text and image parts, generation prompt.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TINY_CORPUS = [
    "<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based on an image content, "
    "suitable for input to a text-to-image model.<|im_end|>\n<|im_start|>user\n",
    "<|im_start|>system\nAs an image editing expert, first analyze the content and attributes of the input image(s). "
    "Then, based on the user's editing instructions, clearly and precisely determine how to modify the given "
    "image(s), ensuring that only the specified parts are altered and all other aspects remain consistent with the "
    "original(s).<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>",
    "<|im_end|>\n<|im_start|>assistant\n",
    "A cat bathed in soft sunlight, its fur soft and glossy, sitting on a wooden table by the window.",
    "A red fox running through fresh snow in a pine forest at dawn, realistic photography style.",
    'A neon sign that reads "OPEN 24 HOURS" above a small diner on a rainy night street.',
    "A poster with the title 'Grassland' in bold green letters, rolling hills and a blue sky.",
    "Change the cat to a dog. Make the sky orange. Remove the car, don't touch the house.",
    "An astronaut riding a horse on the moon, cinematic lighting, 35mm film, high detail.",
    "一只橘猫坐在窗台上，阳光温暖地洒在它身上，背景是城市的街道。",
    "海报上写着“限时5折”，红色背景，白色雪花图案。",
    "User Input: a bowl of ramen. Rewritten prompt: a steaming bowl of ramen with an egg, close-up, warm light.",
    "0123456789 !?.,;:()[]{}<>\"'‘’“”-_+=*/\\|@#$%^&~` \n\t",
]


def build_tiny_tokenizer(texts=None, vocab_size=640):
    """Byte-level BPE Qwen2Tokenizer trained on `texts` (default: a built-in corpus) + the 22 Qwen2.5 tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()  # same normalizer and pre-tokenizer as Qwen2Tokenizer
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 22, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TINY_CORPUS if texts is None else texts, trainer)
    vocab = bpe.get_vocab()
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    for t in QWEN25_SPECIAL_TOKENS + QWEN25_OTHER_ADDED_TOKENS:  # appended after the BPE ids, in Qwen order
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", extra_special_tokens=QWEN25_SPECIAL_TOKENS[1:])
    tok.add_tokens(QWEN25_OTHER_ADDED_TOKENS)  # added, not special (as in Qwen2.5)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_qwen25vl_config(tokenizer, hidden_size=64):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN25_SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    # mrope_section (temporal, height, width) splits head_dim/2 as 1/4, 3/8, 3/8 (Qwen2.5-VL-7B: [16, 24, 24])
    assert hidden_size % 64 == 0, "hidden_size must be a multiple of 64 (4 heads, head_dim/2 divisible by 8)"
    q = hidden_size // 4 // 2 // 8
    text["rope_parameters"]["mrope_section"] = [2 * q, 3 * q, 3 * q]
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"])


def build_tiny_qwen25vl(tokenizer, hidden_size=64, seed=0):
    """Random tiny Qwen2_5_VLForConditionalGeneration (fp32, eval) whose token ids match `tokenizer`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen25vl_config(tokenizer, hidden_size))
    return model.eval()


def build_tiny_image_processor(**overrides):
    """The PIL Qwen2-VL image processor with the transformers defaults (min 56*56, max 28*28*1280 pixels)."""
    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2VLImageProcessorPil(**{**kw, **overrides})


def save_tiny_text_stack(root, tokenizer=None, text_encoder=None, image_processor=None, hidden_size=64, seed=0):
    """Writes root/{text_encoder,tokenizer,text_processor}/ (diffusers layout); returns (tok, encoder, image_proc)."""
    root = Path(root)
    tokenizer = build_tiny_tokenizer() if tokenizer is None else tokenizer
    text_encoder = build_tiny_qwen25vl(tokenizer, hidden_size, seed) if text_encoder is None else text_encoder
    image_processor = build_tiny_image_processor() if image_processor is None else image_processor
    text_encoder.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    # processor.save_pretrained fails without a video processor: save its two halves side by side instead
    tokenizer.save_pretrained(root / "text_processor")
    image_processor.save_pretrained(root / "text_processor")
    return tokenizer, text_encoder, image_processor

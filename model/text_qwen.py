"""LongCat-Image prompt encoding with Qwen2.5-VL (transformers), T2I and Edit, plus the optional prompt rewrite.

What the DiT sees as text (specs/longcat_image.md §5):
  T2I:  ids = T2I_PREFIX (36 tokens) + prompt ids padded to 512 + SUFFIX (5); the encoder's last hidden state
        (after the final RMSNorm) is sliced [36:-5] -> [B, 512, hidden]. Pad positions are kept (the DiT attends them).
  Edit: ids = EDIT_PREFIX with its one <|image_pad|> expanded to N_vis copies + 512 prompt ids + SUFFIX; the encoder
        also gets pixel_values/image_grid_thw; slice from <|vision_start|> (index 67) to -5 -> [1, N_vis + 514, hidden].
Quoted text ('...', "...", ‘...’, “...”) is tokenised one character at a time: that is how LongCat renders text.

Differences from diffusers' LongCatImagePipeline, on purpose:
  - the quote pairs default to the official repo's / SimpleTuner's 36 ordered pairs (so mixed quotes like “text"
    count); QUOTE_PAIRS_DIFFUSERS gives diffusers' 4 matched pairs and bit-identical ids.
  - we run the inner Qwen2_5_VLModel and take last_hidden_state (== diffusers' hidden_states[-1]) instead of the
    full model, so no [B, L, 152k] logits are computed.
  - Edit prompts longer than 512 tokens are truncated (diffusers' Edit crashes there: `len(len(...))`).
Kept on purpose (parity): split_quotation's apostrophe protection, quirks included (see its docstring).
"""

import json
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from model.rewrite_prompts import SYSTEM_PROMPT_EN, SYSTEM_PROMPT_ZH

# model inputs: these strings fix the token ids and must match the released pipelines byte for byte
T2I_PREFIX = ("<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based on an "
              "image content, suitable for input to a text-to-image model.<|im_end|>\n<|im_start|>user\n")
EDIT_PREFIX = ("<|im_start|>system\nAs an image editing expert, first analyze the content and attributes of the input "
               "image(s). Then, based on the user's editing instructions, clearly and precisely determine how to "
               "modify the given image(s), ensuring that only the specified parts are altered and all other aspects "
               "remain consistent with the original(s).<|im_end|>\n<|im_start|>user\n"
               "<|vision_start|><|image_pad|><|vision_end|>")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
MAX_TEXT_TOKENS = 512
IMAGE_TOKEN, VISION_START = "<|image_pad|>", "<|vision_start|>"

QUOTE_PAIRS_DIFFUSERS = [("'", "'"), ('"', '"'), ("‘", "’"), ("“", "”")]
_QUOTES = ["'", '"', "‘", "’", "“", "”"]
# official LongCat / SimpleTuner: the 4 matched pairs first, then every other ordered pair (order matters: at a given
# position the regex takes the first alternative that matches)
QUOTE_PAIRS_OFFICIAL = QUOTE_PAIRS_DIFFUSERS + [(a, b) for a in _QUOTES for b in _QUOTES
                                                if (a, b) not in QUOTE_PAIRS_DIFFUSERS]
_WORD_APOSTROPHE = re.compile(r"[a-zA-Z]+'[a-zA-Z]+")  # don't, it's
_PLACEHOLDER = "longcat_$##$_longcat"

# -----------------------------------------------------------------------------
# prompt -> token ids


def split_quotation(prompt, quote_pairs=QUOTE_PAIRS_OFFICIAL):
    """Splits a prompt into [(segment, is_quoted)]; quote marks stay inside the quoted segments.

    Word-internal apostrophes (don't) are first hidden behind placeholders so they cannot open or close a quote.
    Reference behaviour kept for parity (official repo, diffusers and SimpleTuner share it):
      - the placeholder of the i-th distinct word (in set() order) is the base string repeated i+1 times, so with two
        or more distinct such words restoring can garble them ("don't can't" comes back as "can'tcan't can't" or
        "don't don'tdon't", depending on the process's string-hash seed);
      - a segment counts as quoted when the quote pattern matches at its *start* after the words are restored, so an
        unquoted "'x don't" is reported as quoted.
    """
    swaps = []
    for i, word in enumerate(set(_WORD_APOSTROPHE.findall(prompt))):
        swaps.append((word, _PLACEHOLDER * (i + 1)))
        prompt = prompt.replace(word, swaps[-1][1])
    pattern = "|".join(re.escape(a) + "[^" + re.escape(a + b) + "]*?" + re.escape(b) for a, b in quote_pairs)
    out = []
    for part in re.split(f"({pattern})", prompt):
        for word, placeholder in swaps:
            part = part.replace(placeholder, word)
        if part:
            out.append((part, re.match(pattern, part) is not None))
    return out


_warned_truncation = False


def tokenize_prompt(tokenizer, prompt, quote_pairs=QUOTE_PAIRS_OFFICIAL):
    """Token ids of one prompt (no template): quoted segments char by char, truncated to MAX_TEXT_TOKENS."""
    global _warned_truncation
    ids = []
    for seg, quoted in split_quotation(prompt, quote_pairs):
        pieces = tokenizer(list(seg) if quoted else [seg], add_special_tokens=False)["input_ids"]
        ids += [i for piece in pieces for i in piece]
    if len(ids) > MAX_TEXT_TOKENS:
        if not _warned_truncation:
            print(f"text_qwen: prompt of {len(ids)} tokens truncated to {MAX_TEXT_TOKENS} (warned once)")
            _warned_truncation = True
        ids = ids[:MAX_TEXT_TOKENS]
    return ids


def _template_ids(tokenizer, prefix_ids, prompts, quote_pairs):
    """[prefix | prompt padded to 512 | suffix] for each prompt -> (input_ids [B, L], attention_mask [B, L])."""
    text = tokenizer.pad({"input_ids": [tokenize_prompt(tokenizer, p, quote_pairs) for p in prompts]},
                         max_length=MAX_TEXT_TOKENS, padding="max_length", return_attention_mask=True,
                         return_tensors="pt")  # the tokenizer's own padding side
    suffix_ids = tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]
    B, ids, mask = len(prompts), text["input_ids"], text["attention_mask"]
    pre, suf = torch.tensor(prefix_ids, dtype=ids.dtype), torch.tensor(suffix_ids, dtype=ids.dtype)
    input_ids = torch.cat([pre.expand(B, -1), ids, suf.expand(B, -1)], dim=1)
    ones = lambda n: torch.ones(B, n, dtype=mask.dtype)
    attention_mask = torch.cat([ones(len(prefix_ids)), mask, ones(len(suffix_ids))], dim=1)
    return input_ids, attention_mask, len(suffix_ids)


def build_t2i_inputs(tokenizer, prompts, quote_pairs=QUOTE_PAIRS_OFFICIAL):
    """-> (input_ids [B, 553], attention_mask [B, 553], start=36, end=5); embeddings are hidden[:, start:-end]."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prefix_ids = tokenizer(T2I_PREFIX, add_special_tokens=False)["input_ids"]
    input_ids, attention_mask, end = _template_ids(tokenizer, prefix_ids, prompts, quote_pairs)
    return input_ids, attention_mask, len(prefix_ids), end


def build_edit_inputs(tokenizer, prompt, image_grid_thw, merge_size=2, quote_pairs=QUOTE_PAIRS_OFFICIAL):
    """-> (input_ids [1, L+5], attention_mask, start=67, end=5) with <|image_pad|> expanded to N_vis copies.

    N_vis = prod(image_grid_thw) / merge_size^2; the slice [start:-end] has N_vis + 514 positions.
    """
    n_vis = int(torch.as_tensor(image_grid_thw).prod()) // merge_size ** 2
    prefix_ids = tokenizer(EDIT_PREFIX, add_special_tokens=False)["input_ids"]
    i = prefix_ids.index(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    prefix_ids = prefix_ids[:i] + prefix_ids[i:i + 1] * n_vis + prefix_ids[i + 1:]
    input_ids, attention_mask, end = _template_ids(tokenizer, prefix_ids, [prompt], quote_pairs)
    return input_ids, attention_mask, prefix_ids.index(tokenizer.convert_tokens_to_ids(VISION_START)), end

# -----------------------------------------------------------------------------
# token ids -> embeddings


def _last_hidden_state(text_encoder, **inputs):
    # Qwen2_5_VLForConditionalGeneration keeps the backbone in .model: running only the backbone skips the
    # [B, L, vocab] logits. Its last_hidden_state (after the final norm) is exactly the full model's hidden_states[-1].
    backbone = text_encoder.model if hasattr(text_encoder, "lm_head") else text_encoder
    dev = next(text_encoder.parameters()).device
    return backbone(**{k: v.to(dev) for k, v in inputs.items()}).last_hidden_state


@torch.no_grad()
def encode_prompt_t2i(text_encoder, tokenizer, prompts, quote_pairs=QUOTE_PAIRS_OFFICIAL):
    """T2I prompt embeddings [B, 512, hidden] (in the encoder's dtype)."""
    input_ids, attention_mask, start, end = build_t2i_inputs(tokenizer, prompts, quote_pairs)
    hidden = _last_hidden_state(text_encoder, input_ids=input_ids, attention_mask=attention_mask)
    return hidden[:, start:-end]


@torch.no_grad()
def encode_prompt_edit(text_encoder, tokenizer, image_processor, prompt, vl_image, quote_pairs=QUOTE_PAIRS_OFFICIAL):
    """Edit embeddings [1, N_vis + 514, hidden] for one prompt and its Qwen-side image (PIL, half the target size).

    image_processor: the Qwen PIL image processor, or a processor holding one as .image_processor.
    """
    image_processor = getattr(image_processor, "image_processor", image_processor)
    vl = image_processor(images=vl_image, return_tensors="pt")
    input_ids, attention_mask, start, end = build_edit_inputs(tokenizer, prompt, vl["image_grid_thw"],
                                                              image_processor.merge_size, quote_pairs)
    hidden = _last_hidden_state(text_encoder, input_ids=input_ids, attention_mask=attention_mask,
                                pixel_values=vl["pixel_values"], image_grid_thw=vl["image_grid_thw"])
    return hidden[:, start:-end]

# -----------------------------------------------------------------------------
# prompt rewrite (T2I, diffusers' enable_prompt_rewrite): the text encoder's LM head rewrites the user prompt


def rewrite_prompt_message(prompt):
    """The single user message sent to the rewriter (Chinese system prompt if the prompt has any CJK ideograph)."""
    if re.search(r"[\u4e00-\u9fff]", prompt):
        question = SYSTEM_PROMPT_ZH + f"\n用户输入为：{prompt}\n改写后的prompt为："
    else:
        question = SYSTEM_PROMPT_EN + f"\nUser Input: {prompt}\nRewritten prompt:"
    return [{"role": "user", "content": [{"type": "text", "text": question}]}]


@torch.no_grad()
def rewrite_prompts(text_encoder, processor, prompts, max_new_tokens=512):
    """Rewritten prompts (list[str]); generation uses the encoder's generation_config (greedy unless it says so).

    The batch is padded on the tokenizer's padding side, exactly like diffusers (with right padding, shorter prompts
    in a batch generate after their pads; rewrite one prompt at a time to avoid that).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = [processor.apply_chat_template(rewrite_prompt_message(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    inputs = processor(text=texts, padding=True, return_tensors="pt").to(next(text_encoder.parameters()).device)
    out = text_encoder.generate(**inputs, max_new_tokens=max_new_tokens)
    new_tokens = [o[len(i):] for i, o in zip(inputs["input_ids"], out)]
    return processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

# -----------------------------------------------------------------------------
# loading: tokenizer, PIL image processor and a processor that works without torchvision


class QwenTextProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor with no video processor: the stock one needs torchvision, which we do not install."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)


def make_text_processor(tokenizer, image_processor, chat_template=None):
    return QwenTextProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template or tokenizer.chat_template)


def load_image_processor(path):
    """The Qwen2-VL image processor (PIL backend) from a folder with preprocessor_config.json."""
    return Qwen2VLImageProcessorPil.from_pretrained(str(path))


def _read_chat_template(folder):
    if (folder / "chat_template.jinja").exists():  # the current format
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():  # the legacy processor format
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return None


def _has_tokenizer(folder):
    return (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()


def load_text_processor(path):
    """Processor (tokenizer + image processor + chat template) from a diffusers LongCat folder or its
    text_processor/ folder; the tokenizer falls back to the sibling tokenizer/ folder when text_processor/ has none."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a local diffusers LongCat folder or its text_processor/ folder")
    proc_dir = path / "text_processor" if (path / "text_processor").is_dir() else path
    tok_dir = proc_dir if _has_tokenizer(proc_dir) else proc_dir.parent / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return make_text_processor(tokenizer, load_image_processor(proc_dir), _read_chat_template(proc_dir))

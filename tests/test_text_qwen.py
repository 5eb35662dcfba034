"""model/text_qwen.py and model/tiny_qwen.py against diffusers' LongCat pipelines (test-only reference).

Token-level checks use the real Qwen2.5 vocabulary (tests/qwen_vocab.py); embedding-level checks use a tiny random
Qwen2.5-VL (model/tiny_qwen.py), compared bit for bit with LongCatImagePipeline / LongCatImageEditPipeline.
"""

import copy
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from model import text_qwen as tq
from model.text_qwen import (EDIT_PREFIX, MAX_TEXT_TOKENS, QUOTE_PAIRS_DIFFUSERS, QUOTE_PAIRS_OFFICIAL, SUFFIX,
                             T2I_PREFIX, build_edit_inputs, build_t2i_inputs, encode_prompt_edit, encode_prompt_t2i,
                             load_text_processor, make_text_processor, rewrite_prompts, split_quotation,
                             tokenize_prompt)
from model.tiny_qwen import (build_tiny_image_processor, build_tiny_qwen25vl, build_tiny_tokenizer,
                             save_tiny_text_stack)
from tests.qwen_vocab import real_qwen_tokenizer

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImageEditPipeline, LongCatImagePipeline  # noqa: E402
from diffusers.pipelines.longcat_image import pipeline_longcat_image as ref_t2i  # noqa: E402
from diffusers.pipelines.longcat_image import system_messages  # noqa: E402

PROMPTS = [
    "a cat sitting on a windowsill",
    "",
    'a neon sign that reads "OPEN 24 HOURS" at night',
    "I don't know, it's the cat's toy",
    "write 'Hello' and \"World\" on the board",
    "一只猫，海报上写着“限时5折”和‘新品’",
    "mixed “quotes\" and 'single’ here",
    "unbalanced \"quote and it's fine",
    "I don't know, you can't say 'it's fine'",  # two distinct apostrophe words: the reference garbles them
    "a long prompt " * 200,  # > 512 tokens: truncated
    'a long quoted text "' + "abcdefghij" * 60 + '"',  # char-level, > 512 tokens
]


def pipelines(text_encoder, tokenizer, processor):
    kw = dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None, text_encoder=text_encoder,
              tokenizer=tokenizer, text_processor=processor)
    return LongCatImagePipeline(**kw), LongCatImageEditPipeline(**kw)


class Capture(torch.nn.Module):
    """Stands in for the text encoder: records what diffusers feeds it and returns zeros."""

    device = torch.device("cpu")  # diffusers' pipeline.device asks every nn.Module component

    def forward(self, input_ids, attention_mask, output_hidden_states=True, **kw):
        self.input_ids, self.attention_mask, self.kw = input_ids, attention_mask, kw
        return SimpleNamespace(hidden_states=[torch.zeros(*input_ids.shape, 1)])


def vl_image(w=512, h=512, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def real():
    tok = real_qwen_tokenizer()
    proc = make_text_processor(tok, build_tiny_image_processor())  # the transformers default image processor
    cap = Capture()
    t2i, edit = pipelines(cap, tok, proc)
    return SimpleNamespace(tok=tok, proc=proc, cap=cap, t2i=t2i, edit=edit)


@pytest.fixture(scope="module")
def tiny():
    tok = build_tiny_tokenizer()
    model = build_tiny_qwen25vl(tok, hidden_size=64, seed=0)
    ip = build_tiny_image_processor()
    proc = make_text_processor(tok, ip)
    t2i, edit = pipelines(model, tok, proc)
    return SimpleNamespace(tok=tok, model=model, ip=ip, proc=proc, t2i=t2i, edit=edit)

# -----------------------------------------------------------------------------
# split_quotation and the quote-pair sets


def test_quote_pair_sets():
    assert QUOTE_PAIRS_DIFFUSERS == [("'", "'"), ('"', '"'), ("\u2018", "\u2019"), ("\u201c", "\u201d")]
    quotes = ["'", '"', "\u2018", "\u2019", "\u201c", "\u201d"]
    assert len(QUOTE_PAIRS_OFFICIAL) == 36 and QUOTE_PAIRS_OFFICIAL[:4] == QUOTE_PAIRS_DIFFUSERS
    assert set(QUOTE_PAIRS_OFFICIAL) == {(a, b) for a in quotes for b in quotes}
    rest = [(a, b) for a in quotes for b in quotes if (a, b) not in QUOTE_PAIRS_DIFFUSERS]
    assert QUOTE_PAIRS_OFFICIAL[4:] == rest  # SimpleTuner's construction order


SPLIT_CASES = PROMPTS[:9] + [
    "Please write 'Hello' on the blackboard for me.",
    "it’s a ‘test’",
    "'x don't",
    "“a” ‘b’ 'c' \"d\"",
    "nested \"a 'b' c\" end",
    "''",
    "rock'n'roll isn't 'dead'",
    "don't don't",
    "Tom's and Tom's",
]


@pytest.mark.parametrize("prompt", SPLIT_CASES)
def test_split_quotation_matches_diffusers(prompt):
    assert split_quotation(prompt, QUOTE_PAIRS_DIFFUSERS) == ref_t2i.split_quotation(prompt)
    # the official set runs the same algorithm with 36 pairs (SimpleTuner passes them to the same function)
    assert split_quotation(prompt) == ref_t2i.split_quotation(prompt, QUOTE_PAIRS_OFFICIAL)


def test_split_quotation_documented_behaviour():
    assert split_quotation("Please write 'Hello' on it.") == [("Please write ", False), ("'Hello'", True),
                                                               (" on it.", False)]
    assert split_quotation("I don't say 'hi'") == [("I don't say ", False), ("'hi'", True)]
    # mixed quotes: only the official 36 pairs see a quote
    assert split_quotation('write “OPEN" now') == [("write ", False), ('“OPEN"', True), (" now", False)]
    assert split_quotation('write “OPEN" now', QUOTE_PAIRS_DIFFUSERS) == [('write “OPEN" now', False)]
    # a curly apostrophe is not protected: with 36 pairs it opens a quote that the next ‘ closes
    assert split_quotation("it’s a ‘test’") == [("it", False), ("’s a ‘", True), ("test’", False)]
    assert split_quotation("it’s a ‘test’", QUOTE_PAIRS_DIFFUSERS) == [("it’s a ", False), ("‘test’", True)]
    # reference quirk: the apostrophe word is restored before the prefix match, so this unquoted text is "quoted"
    assert split_quotation("'x don't") == [("'x don't", True)]
    assert split_quotation("") == []


def test_split_quotation_garbles_two_apostrophe_words_like_the_reference():
    # the i-th placeholder is the base string repeated i+1 times, so restoring can merge words; kept for parity
    out = "".join(s for s, _ in split_quotation("don't can't"))
    assert out in ("can'tcan't can't", "don't don'tdon't") and out == "".join(
        s for s, _ in ref_t2i.split_quotation("don't can't"))

# -----------------------------------------------------------------------------
# token ids with the real Qwen2.5 vocabulary


def test_templates_match_diffusers(real):
    assert (T2I_PREFIX, SUFFIX) == (real.t2i.prompt_template_encode_prefix, real.t2i.prompt_template_encode_suffix)
    assert (EDIT_PREFIX, SUFFIX) == (real.edit.prompt_template_encode_prefix, real.edit.prompt_template_encode_suffix)
    assert MAX_TEXT_TOKENS == real.t2i.tokenizer_max_length == real.edit.tokenizer_max_length


def test_real_tokenizer_facts(real):
    tok = real.tok
    assert len(tok) == 151665 and tok("Hello world")["input_ids"] == [9707, 1879]
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                      "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]}
    assert list(ids.values()) == [151643, 151644, 151645, 151652, 151653, 151655]
    assert tok.pad_token_id == 151643 and tok.eos_token == "<|im_end|>"
    assert len(tok(T2I_PREFIX, add_special_tokens=False)["input_ids"]) == 36
    assert len(tok(SUFFIX, add_special_tokens=False)["input_ids"]) == 5
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")  # the package's own tiktoken encoder agrees
    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for s in PROMPTS[:9] + [T2I_PREFIX, "def f(x):\n    return x**2  # 12345", "émoji 🎉 naïve café\n\n\t "]:
        assert tok(s, add_special_tokens=False)["input_ids"] == ref.encode(s), s


def test_t2i_ids_match_diffusers(real):
    real.t2i._encode_prompt(PROMPTS)
    input_ids, attention_mask, start, end = build_t2i_inputs(real.tok, PROMPTS, QUOTE_PAIRS_DIFFUSERS)
    assert (start, end) == (36, 5) and input_ids.shape == (len(PROMPTS), 36 + 512 + 5)
    assert torch.equal(input_ids, real.cap.input_ids) and torch.equal(attention_mask, real.cap.attention_mask)
    assert input_ids.dtype == real.cap.input_ids.dtype and attention_mask.dtype == real.cap.attention_mask.dtype
    assert input_ids[1, 36:-5].eq(151643).all() and attention_mask[1, 36:-5].eq(0).all()  # "" -> 512 pads
    assert attention_mask[-2:, 36:-5].eq(1).all()  # the long prompts are truncated to exactly 512


def test_official_quote_pairs_change_only_mixed_quotes(real):
    tok = real.tok
    for p in PROMPTS:
        if p not in (PROMPTS[6],):
            assert tokenize_prompt(tok, p) == tokenize_prompt(tok, p, QUOTE_PAIRS_DIFFUSERS), p
    p = 'write “OPEN" now'
    char_ids = [i for c in '“OPEN"' for i in tok(c, add_special_tokens=False)["input_ids"]]
    ours = tokenize_prompt(tok, p)
    assert ours == tok("write ", add_special_tokens=False)["input_ids"] + char_ids + tok(
        " now", add_special_tokens=False)["input_ids"]
    assert tokenize_prompt(tok, p, QUOTE_PAIRS_DIFFUSERS) == tok(p, add_special_tokens=False)["input_ids"] != ours


def test_padding_side_follows_the_tokenizer(tiny):
    tok = copy.deepcopy(tiny.tok)
    tok.padding_side = "left"
    cap = Capture()
    pipelines(cap, tok, tiny.proc)[0]._encode_prompt(["a cat", ""])
    input_ids, attention_mask, start, end = build_t2i_inputs(tok, ["a cat", ""])
    assert torch.equal(input_ids, cap.input_ids) and torch.equal(attention_mask, cap.attention_mask)
    assert attention_mask[0, start + 511] == 1 and attention_mask[0, start] == 0  # left padded


def test_truncation_warns_once(real, monkeypatch, capsys):
    monkeypatch.setattr(tq, "_warned_truncation", False)
    assert len(tokenize_prompt(real.tok, PROMPTS[-2])) == MAX_TEXT_TOKENS
    assert len(tokenize_prompt(real.tok, PROMPTS[-1])) == MAX_TEXT_TOKENS
    assert capsys.readouterr().out.count("truncated") == 1


def test_edit_ids_match_diffusers(real):
    img = vl_image(512, 512)
    grid = real.proc.image_processor(images=img, return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 36, 36]]  # 512x512 -> smart_resize 504x504 -> 36x36 patches of 14
    for p in PROMPTS[:9]:
        real.edit._encode_prompt([p], img)
        input_ids, attention_mask, start, end = build_edit_inputs(real.tok, p, grid, 2, QUOTE_PAIRS_DIFFUSERS)
        assert torch.equal(input_ids, real.cap.input_ids) and torch.equal(attention_mask, real.cap.attention_mask)
        assert (start, end) == (67, 5) and input_ids[0, start] == 151652
        assert input_ids[0, start:-end].eq(151655).sum() == 324 and input_ids.shape[1] - start - end == 838
        assert torch.equal(real.cap.kw["image_grid_thw"], grid)


def test_edit_long_prompt_truncates_where_diffusers_crashes(real):
    grid = torch.tensor([[1, 4, 4]])
    input_ids, _, start, end = build_edit_inputs(real.tok, PROMPTS[-2], grid)
    assert input_ids.shape[1] - start - end == 4 + 514
    with pytest.raises(TypeError):  # diffusers 0.42.1 logs len(len(all_tokens))
        real.edit._encode_prompt([PROMPTS[-2]], vl_image(56, 56))

# -----------------------------------------------------------------------------
# embeddings with a tiny random Qwen2.5-VL


def test_tiny_tokenizer_is_qwen_like(tiny):
    tok = tiny.tok
    assert 400 <= len(tok) <= 1000 and tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    names = ["<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|file_sep|>"]
    ids = tok.convert_tokens_to_ids(names)
    assert ids == [len(tok) - 22, len(tok) - 21, len(tok) - 13, len(tok) - 10, len(tok) - 1]
    assert tok.decode(tok("a “neon” sign 一只猫")["input_ids"]) == "a “neon” sign 一只猫"
    assert len(tok(T2I_PREFIX)["input_ids"]) == 50 and len(tok(SUFFIX)["input_ids"]) == 8  # templates in the corpus


def test_encode_prompt_t2i_matches_diffusers(tiny):
    prompts = PROMPTS[:9]
    ref = tiny.t2i.encode_prompt(prompts)[0]
    ours = encode_prompt_t2i(tiny.model, tiny.tok, prompts, quote_pairs=QUOTE_PAIRS_DIFFUSERS)
    assert ours.shape == (len(prompts), 512, 64) and torch.equal(ours, ref)
    assert not torch.equal(ours[0], ours[1])


@pytest.mark.parametrize("size", [(512, 512), (96, 64)])
def test_encode_prompt_edit_matches_diffusers(tiny, size):
    img, p = vl_image(*size), 'change the sign to "CLOSED", don\'t move the car'
    ref = tiny.edit.encode_prompt([p], img)[0]
    ours = encode_prompt_edit(tiny.model, tiny.tok, tiny.ip, p, img, quote_pairs=QUOTE_PAIRS_DIFFUSERS)
    n_vis = int(tiny.ip(images=img, return_tensors="pt")["image_grid_thw"].prod()) // 4
    assert ours.shape == (1, n_vis + 514, 64) and torch.equal(ours, ref)
    assert n_vis == (324 if size == (512, 512) else 6)
    # a processor holding the image processor works too
    assert torch.equal(encode_prompt_edit(tiny.model, tiny.tok, tiny.proc, p, img, QUOTE_PAIRS_DIFFUSERS), ours)


def test_rewrite_prompts_match_diffusers(tiny, monkeypatch):
    monkeypatch.setattr(tiny.t2i, "tokenizer_max_length", 4)  # diffusers uses it as max_new_tokens
    for prompts in (["a cat on the moon"], ["a cat", "一只猫在月球上"]):
        ref = tiny.t2i.rewire_prompt(prompts, "cpu")
        ours = rewrite_prompts(tiny.model, tiny.proc, prompts, max_new_tokens=4)
        assert ours == ref and len(ours) == len(prompts)


def test_rewrite_system_prompts_are_exact():
    from model.rewrite_prompts import SYSTEM_PROMPT_EN, SYSTEM_PROMPT_ZH
    assert SYSTEM_PROMPT_EN == system_messages.SYSTEM_PROMPT_EN
    assert SYSTEM_PROMPT_ZH == system_messages.SYSTEM_PROMPT_ZH
    assert "User Input" in tq.rewrite_prompt_message("a cat")[0]["content"][0]["text"]
    assert tq.rewrite_prompt_message("一只猫")[0]["content"][0]["text"].endswith("\n用户输入为：一只猫\n改写后的prompt为：")


def test_product_files_do_not_import_diffusers_or_peft():
    import pathlib
    for name in ("text_qwen.py", "tiny_qwen.py", "rewrite_prompts.py"):
        src = (pathlib.Path(tq.__file__).parent / name).read_text()
        assert not re.search(r"^\s*(import|from)\s+(diffusers|peft|torchvision)\b", src, re.M), name

# -----------------------------------------------------------------------------
# a diffusers-format folder round trip


def test_save_tiny_text_stack_round_trip(tiny, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    save_tiny_text_stack(tmp_path, tiny.tok, tiny.model, tiny.ip)
    for sub in ("text_encoder", "tokenizer", "text_processor"):
        assert (tmp_path / sub).is_dir()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    proc = load_text_processor(tmp_path)
    assert proc.chat_template == tiny.proc.chat_template and proc.image_processor.merge_size == 2
    prompts = ['a "red" fox', ""]
    want = encode_prompt_t2i(tiny.model, tiny.tok, prompts)
    assert torch.equal(encode_prompt_t2i(model, tok, prompts), want)
    assert torch.equal(encode_prompt_t2i(model, proc.tokenizer, prompts), want)
    img = vl_image(80, 64)
    assert torch.equal(encode_prompt_edit(model, tok, proc, "make it red", img),
                       encode_prompt_edit(tiny.model, tiny.tok, tiny.ip, "make it red", img))
    # text_processor/ without tokenizer files falls back to tokenizer/
    for f in (tmp_path / "text_processor").iterdir():
        if f.name != "preprocessor_config.json":
            f.unlink()
    proc2 = load_text_processor(tmp_path / "text_processor")
    assert proc2.tokenizer.get_vocab() == tiny.tok.get_vocab()
    assert proc2.chat_template == tiny.tok.chat_template  # from the tokenizer's own chat_template.jinja


def test_load_text_processor_legacy_layout(tiny, tmp_path):
    # the layout transformers 4.x processors saved (chat_template.json, min/max_pixels), as in the hub checkpoints
    import json
    d = tmp_path / "text_processor"
    tiny.tok.save_pretrained(d)
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'legacy' }}"}))
    cfg = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    (d / "preprocessor_config.json").write_text(json.dumps(cfg))
    proc = load_text_processor(tmp_path)
    assert proc.chat_template == "{{ 'legacy' }}"
    assert (proc.image_processor.size.shortest_edge, proc.image_processor.size.longest_edge) == (3136, 12845056)
    assert proc.image_processor(images=vl_image(512, 512), return_tensors="pt")["image_grid_thw"].tolist() == [[1, 36, 36]]

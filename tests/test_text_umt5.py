"""model/text_umt5.py and model/tiny_umt5.py: LongCat-Video's umT5 prompt encoding (specs/longcat_video.md §3).

The embeddings are checked against a direct UMT5EncoderModel call on the same tokenizer output; cleaning against the
release's rules (and against ftfy itself when it is installed).
"""

import pytest
import torch
from transformers import AutoTokenizer, T5Tokenizer, UMT5EncoderModel

from model.text_umt5 import MAX_TEXT_TOKENS, clean_prompt, encode_prompt_umt5, fix_text_subset, load_umt5, tokenize_umt5
from model.tiny_umt5 import build_tiny_tokenizer, build_tiny_umt5, save_tiny_umt5

PROMPTS = [
    "A cat walks slowly across a wooden table by the window, the camera pans left.",
    "",  # the release's default negative prompt
    "  a   red fox\n\truns through   snow  ",
    "一只橘猫坐在窗台上，阳光温暖地洒在它身上。",
    "a long prompt " * 300,  # > 512 tokens: truncated, </s> kept
]


@pytest.fixture(scope="module")
def tiny():
    tok = build_tiny_tokenizer()
    return tok, build_tiny_umt5(tok, d_model=64, seed=0)


@pytest.mark.parametrize("raw, clean", [
    ("  a   cat \n\t sits\u00a0here  ", "a cat sits here"),  # strip + every whitespace run -> one space
    ("&amp;lt;b&amp;gt; &quot;hi&quot;", '<b> "hi"'),  # html.unescape twice (ftfy's own pass included)
    ("“curly” ‘quotes’", "\"curly\" 'quotes'"),  # ftfy uncurls quotes
    ("ＬｏｎｇＣａｔ，　ｖｉｄｅｏ：", "LongCat, video:"),  # full-width forms and U+3000 -> standard width
    ("ﬁne ﬂowers", "fine flowers"),  # Latin ligatures
    ("ctrl\x00\x07\x1b[31mred\x1b[0m\ufeff!", "ctrlred!"),  # control characters and ANSI escapes removed
    ("e\u0301", "\u00e9"),  # NFC
    ("一只猫。", "一只猫。"),
    ("", ""),
])
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean


def test_fallback_cleaner_matches_ftfy():
    ftfy = pytest.importorskip("ftfy", reason="ftfy not installed: the fallback subset is in use")
    cases = ["ﬁne ĳs ŉ", "ＦＵＬＬ　ｗｉｄｔｈ，ｶﾀｶﾅ", "a\r\nb\rc\u2028d\x85e", "&amp;amp;lt; &EACUTE; &copy",
             "<b>&amp;</b>\n&amp;", "c1 \x80\x93\x81", "\ud83d\ude00 lone \ud800", "一只猫，“你好”", "ctl\x00\x1c\x7f\u206a\ufffc"]
    for c in cases:
        assert fix_text_subset(c) == ftfy.fix_text(c), c


def test_tokenize_layout(tiny):
    tok, _ = tiny
    assert isinstance(tok, T5Tokenizer) and (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids, mask = tokenize_umt5(tok, PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), MAX_TEXT_TOKENS)
    n = mask.sum(1)
    for i in range(len(PROMPTS)):
        assert mask[i, :n[i]].all() and not mask[i, n[i]:].any()  # right padding
        assert ids[i, n[i] - 1] == 1 and (ids[i, n[i]:] == 0).all()  # </s> last, then pad id 0
    assert ids[1, 0] == 1 and n[1] == 1  # "" -> just </s>
    assert n[4] == MAX_TEXT_TOKENS  # truncated, and </s> still closes it
    assert tokenize_umt5(tok, PROMPTS[2])[0].tolist() == tok(["a red fox runs through snow"], padding="max_length",
                                                             max_length=MAX_TEXT_TOKENS)["input_ids"]


def test_encode_matches_direct_call(tiny):
    tok, enc = tiny
    embeds, mask = encode_prompt_umt5(enc, tok, PROMPTS)
    t = tok([clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=512, truncation=True,
            add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        ref = enc(t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
    assert embeds.shape == (len(PROMPTS), 512, 64) and embeds.dtype == torch.float32
    assert torch.equal(mask, t["attention_mask"]) and torch.equal(embeds, ref)
    # pads are left as the encoder computed them (the DiT zeroes them after its caption projection)
    assert embeds[0][mask[0] == 0].abs().sum(-1).gt(0).all()


def test_mask_is_used(tiny):
    """Real-token outputs do not depend on how many pads follow: pads are masked out as keys."""
    tok, enc = tiny
    long, mask = encode_prompt_umt5(enc, tok, PROMPTS[:4])
    short, _ = encode_prompt_umt5(enc, tok, PROMPTS[:4], max_length=100)
    for i in range(4):
        n = int(mask[i].sum())
        assert n < 100
        torch.testing.assert_close(short[i, :n], long[i, :n], rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip(tiny, tmp_path):
    tok, enc = tiny
    save_tiny_umt5(tmp_path, tok, enc)
    assert (tmp_path / "text_encoder" / "config.json").exists() and (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert isinstance(AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer")), T5Tokenizer)
    tok2, enc2 = load_umt5(tmp_path, "cpu", torch.float32)
    assert isinstance(enc2, UMT5EncoderModel) and not enc2.training
    assert torch.equal(tokenize_umt5(tok2, PROMPTS)[0], tokenize_umt5(tok, PROMPTS)[0])
    assert torch.equal(encode_prompt_umt5(enc2, tok2, PROMPTS)[0], encode_prompt_umt5(enc, tok, PROMPTS)[0])
    tok3, enc3 = load_umt5(tmp_path / "text_encoder", "cpu", torch.bfloat16)  # a text_encoder/ path works too
    embeds, _ = encode_prompt_umt5(enc3, tok3, PROMPTS[:2])
    assert embeds.dtype == torch.bfloat16 and torch.isfinite(embeds.float()).all()
    with pytest.raises(FileNotFoundError):
        load_umt5(tmp_path / "nope", "cpu", torch.float32)



def test_pickle_only_text_encoder_is_refused(tiny, tmp_path, monkeypatch):
    """Issue 15 item 9: a text_encoder/ with only pytorch_model.bin was unpickled by transformers; now it is one
    WeightsError line saying safetensors is required (and how to convert), and from_pretrained never unpickles."""
    from model.loading import WeightsError
    tok, enc = tiny
    enc.config.save_pretrained(tmp_path / "text_encoder")
    torch.save(enc.state_dict(), tmp_path / "text_encoder" / "pytorch_model.bin")  # the legacy pickle layout
    tok.save_pretrained(tmp_path / "tokenizer")
    assert (tmp_path / "text_encoder" / "pytorch_model.bin").exists()
    assert not list((tmp_path / "text_encoder").glob("*.safetensors"))

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called on a user file")
    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(WeightsError, match=r"only pickle weights \(pytorch_model.bin\); safetensors is required") as e:
        load_umt5(tmp_path, "cpu", torch.float32)
    assert "\n" not in str(e.value) and "save_pretrained" in str(e.value)

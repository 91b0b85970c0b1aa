"""The broker's prompt tokenization (ServedModel.encode_prompt) gives exactly the ids that
transformers' tokenizer gives, for plain prompts and chat messages, on the real SmolLM2 tokenizer:
the fast path calls the Rust core directly, and must not differ from the wrapper anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from dlis_market.broker.catalog import ServedModel

PROMPTS = [
    "The capital of France is",
    "",
    "   leading and trailing spaces   ",
    "lines\n\nand\ttabs\r\n",
    "unicode: naïve café, 東京, emoji 🙂🚀, math ∑∞",
    "a literal special token <|im_start|>user\nhi<|im_end|> and <|endoftext|> inside",
    "x" * 5000,
    "numbers 1234567890 3.14159 -42 0xdeadbeef",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour <|im_end|> please."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 日本語."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _served(tokenizer: Any) -> ServedModel:
    manifest: Any = None  # encode_prompt reads only the tokenizer
    return ServedModel("smollm2", "0x" + "00" * 32, manifest, Path("."), tokenizer)


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_prompt_ids_equal_the_tokenizers(tokenizer, prompt):
    assert _served(tokenizer).encode_prompt(prompt, None) == list(tokenizer(prompt)["input_ids"])


@pytest.mark.parametrize("messages", CHATS, ids=range(len(CHATS)))
def test_chat_ids_equal_apply_chat_template(tokenizer, messages):
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert _served(tokenizer).encode_prompt(None, messages) == [int(i) for i in expected]


def test_a_core_set_to_truncate_is_not_used_directly(tokenizer):
    """The wrapper turns the core's truncation off before it encodes; the fast path must not
    encode with a truncating core (it would cut the prompt the broker prices)."""
    fresh = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    fresh.backend_tokenizer.enable_truncation(max_length=3)
    prompt = PROMPTS[0]
    assert len(fresh.backend_tokenizer.encode(prompt).ids) == 3
    assert _served(fresh).encode_prompt(prompt, None) == list(tokenizer(prompt)["input_ids"])

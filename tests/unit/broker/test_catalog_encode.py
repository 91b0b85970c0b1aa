"""The broker's prompt tokenization (ServedModel.encode_prompt) gives exactly the ids that
transformers' tokenizer gives, for plain prompts and chat messages, on the real SmolLM2 tokenizer:
the fast path calls the Rust core directly, and must not differ from the wrapper anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from dlis_market.broker.catalog import ServedModel, load_tokenizer

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


def test_the_brokers_tokenizer_is_autotokenizers_without_the_model_config_class(tokenizer, smollm2_dir):
    """load_tokenizer skips the model's config class (its module imports transformers' modeling
    integrations, ~1 s of a broker's start) and gives AutoTokenizer's tokenizer all the same."""
    import subprocess
    import sys

    loaded = load_tokenizer(smollm2_dir)
    assert type(loaded) is type(tokenizer)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
    )  # fmt: skip
    for prompt in PROMPTS:
        assert loaded(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    for messages in CHATS:
        assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
    code = (
        "import sys\nfrom pathlib import Path\nfrom dlis_market.broker.catalog import load_tokenizer\n"
        f"load_tokenizer(Path({str(smollm2_dir)!r}))\n"
        "print(*(m in sys.modules for m in ('transformers.models.llama.configuration_llama', "
        "'transformers.activations')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]

"""Streaming detokenization: complete characters only, and the pieces add up to the whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece

from paged_jax.io.detokenizer import IncrementalDetokenizer
from paged_jax.io.tokenizer import Tokenizer, load_tokenizer

STREAM_TEXTS = [
    "I ❤️ 🦙 and 👩‍👩‍👧, really 😀🎉!",
    "東京は日本の首都です。中文测试，한국어 텍스트.",
    "Mixed: naïve café 東京 😀 x=42;\n\tdone",
]


@pytest.fixture(scope="module")
def smollm(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    return detok, [detok.add(i) for i in ids]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_emits_whole_characters(smollm: Tokenizer, text: str) -> None:
    ids = smollm.encode(text)
    detok, pieces = _stream(smollm, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == detok.text == smollm.decode(ids) == text
    assert "" in pieces and len(ids) > len(text.encode("utf-8")) // 4  # some characters span tokens


def test_each_step_is_a_prefix_of_the_text(smollm: Tokenizer) -> None:
    text = STREAM_TEXTS[0]
    detok = IncrementalDetokenizer(smollm)
    for i in smollm.encode(text):
        detok.add(i)
        assert text.startswith(detok.text)


def test_emoji_bytes_held_back_until_complete(smollm: Tokenizer) -> None:
    ids = smollm.encode("🦙")
    assert len(ids) > 1  # the llama emoji is split over byte tokens in this vocabulary
    detok, pieces = _stream(smollm, ids)
    assert pieces == [""] * (len(ids) - 1) + ["🦙"]


def test_flush_releases_an_unfinished_character(smollm: Tokenizer) -> None:
    ids = smollm.encode("ok 🦙")
    detok, _ = _stream(smollm, ids[:-1])
    assert detok.text == "ok"
    assert detok.flush().endswith("\ufffd")
    assert detok.text.startswith("ok ")


def test_prompt_context_keeps_the_leading_space(smollm: Tokenizer) -> None:
    prompt = smollm.encode("The capital of France is")
    detok, pieces = _stream(smollm, smollm.encode(" Paris. 東京!"), prompt_ids=prompt)
    assert detok.text == " Paris. 東京!"
    assert pieces[0] == " Paris"


def test_special_tokens_skipped_or_kept(smollm: Tokenizer) -> None:
    ids = smollm.encode("Hello<|im_end|> 😀")
    skipped, _ = _stream(smollm, ids)
    kept, _ = _stream(smollm, ids, skip_special_tokens=False)
    assert skipped.text == "Hello 😀"
    assert kept.text == "Hello<|im_end|> 😀"


def test_sentencepiece_spaces_and_byte_fallback(tmp_path: Path) -> None:
    # SentencePiece decoders drop the first token's "▁": only the window context keeps spaces.
    words = "stream tokens one at a time with spaces between words".split()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(words[i:] + words[:i]) for i in range(len(words))),
        model_prefix=str(tmp_path / "tokenizer"),
        model_type="bpe",
        vocab_size=300,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    tok = load_tokenizer(tmp_path)
    text = "stream 😀 tokens  with   spaces 東京"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    detok, pieces = _stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text

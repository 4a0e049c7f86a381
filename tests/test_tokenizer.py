"""Tokenizers from every source: the SmolLM2 GGUF against HF reference ids, a SentencePiece model
trained here (folder and GGUF "llama" form), a tokenizers BPE folder, and bad inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from paged_jax.io.gguf_tokenizer import byte_level_pre_tokenizer
from paged_jax.io.tokenizer import Tokenizer, load_tokenizer

ROUND_TRIP = [
    "Hello, world!",
    "café naïve résumé Ærøskøbing",
    "emoji 😀🎉👩‍👩‍👧 ok",
    "中文测试，日本語のテキスト、한국어",
    "digits 0123456789 3.14159 1,000,000",
    "tabs\tand\nnewlines\n\n  runs   of    spaces   ",
    "   leading and trailing   ",
    "",
]


# --- SmolLM2 GGUF (byte-level BPE) against HF transformers ------------------------------------


@pytest.fixture(scope="module")
def smollm(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(data_dir: Path) -> dict:
    return json.loads((data_dir / "smollm2_tokenizer.json").read_text(encoding="utf-8"))


def test_smollm2_ids_match_hf(smollm: Tokenizer, reference: dict) -> None:
    assert reference["cases"]
    for case in reference["cases"]:
        assert smollm.encode(case["text"], add_bos=False) == case["ids"], case["text"]


def test_smollm2_special_ids(smollm: Tokenizer, reference: dict) -> None:
    assert smollm.vocab_size == 49152
    assert smollm.bos_token_id == reference["bos_token_id"]
    assert smollm.eos_token_ids[0] == reference["eos_token_id"]
    assert set(smollm.eos_token_ids) == {0, 2}  # <|im_end|> ends a turn, <|endoftext|> a text
    assert smollm.add_bos is False
    assert smollm.encode("Hi") == [26843]
    assert smollm.is_special(2) and not smollm.is_special(26843)


def test_smollm2_chat_template_matches_hf(smollm: Tokenizer, reference: dict) -> None:
    assert reference["chat"]
    for case in reference["chat"]:
        text = smollm.apply_chat_template(
            case["messages"], add_generation_prompt=case["add_generation_prompt"]
        )
        assert text == case["text"]
        assert smollm.encode(text) == case["ids"]


def test_smollm2_digits_split_before_the_regex(smollm: Tokenizer) -> None:
    # tokenizer.ggml.pre="smollm": digits are cut out before GPT-2's regex runs (llama.cpp, and
    # the model's own tokenizer), so "\n\n" before a digit stays one pre-token and merges to
    # "ĊĊ" (1116). HF transformers' GGUF loader gives [198, 198, 33] and [104, 216, 216, 34].
    assert smollm.encode("\n\n1") == [1116, 33]
    assert smollm.encode("x  2") == [104, 256, 34]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_smollm2_round_trip(smollm: Tokenizer, text: str) -> None:
    assert smollm.decode(smollm.encode(text)) == text


def test_smollm2_special_tokens_and_bos(smollm: Tokenizer) -> None:
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm.decode(ids) == "user\nhi"
    assert smollm.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    # BOS is prepended on request, but not twice when the text already starts with it.
    assert smollm.encode("hi", add_bos=True) == [1, *smollm.encode("hi")]
    assert smollm.encode("<|im_start|>hi", add_bos=True).count(1) == 1
    assert smollm.decode([26843, 10**6]) == "Hi"  # ids past the vocab decode to nothing


# --- SentencePiece: a model trained here, as an HF folder and as a GGUF "llama" vocab -----------

SP_STRINGS = [
    "the quick brown fox",
    "The Quick Brown Fox jumps over the lazy dog.",
    "  two leading spaces and a trailing one ",
    "a  b   c    d",
    "numbers 12345 and 3.25",
    "crème brûlée",
    "中文 and emoji 🦊🎉",
    "line one\nline two\n\ttabbed",
]


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over lazy dog tokenizer pages attention cache model "
        "sequence inference engine batch crème brûlée naïve numbers 123 456 7 8 9 0"
    ).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sp_model")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=360,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        control_symbols=["<|end|>"],
        user_defined_symbols=["<|user|>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        num_threads=1,
        minloglevel=2,
    )
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def sp(sp_folder: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))


def test_sentencepiece_folder_matches_sentencepiece(sp_folder: Path, sp) -> None:
    tok = load_tokenizer(sp_folder)
    assert (tok.bos_token_id, tok.eos_token_ids[0], tok.add_bos) == (1, 2, True)
    assert tok.vocab_size == sp.get_piece_size() == 360
    for text in SP_STRINGS:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.encode(text) == [1, *sp.encode(text)]
        assert tok.decode(tok.encode(text)) == text
    assert any(sp.is_byte(i) for i in tok.encode("中文 🦊"))  # CJK/emoji go through byte fallback


def test_sentencepiece_folder_control_tokens(sp_folder: Path, sp) -> None:
    tok = load_tokenizer(sp_folder)
    end = sp.piece_to_id("<|end|>")
    assert tok.encode("hi there<|end|>", add_bos=False) == [*sp.encode("hi there"), end]
    assert tok.is_special(end) and tok.is_special(1) and not tok.is_special(sp.encode("hi")[-1])
    assert tok.decode([1, *sp.encode("hi there"), end]) == "hi there"
    assert tok.decode([*sp.encode("hi"), end], skip_special_tokens=False) == "hi<|end|>"


def test_sentencepiece_folder_added_tokens(sp_folder: Path, sp, tmp_path: Path) -> None:
    # tokenizer_config.json may add tokens past the model's own pieces, special or not.
    (tmp_path / "tokenizer.model").write_bytes((sp_folder / "tokenizer.model").read_bytes())
    added = {"360": {"content": "<think>", "special": False}, "361": {"content": "<|tool|>"}}
    config = {"added_tokens_decoder": added, "add_bos_token": False, "eos_token": "<|tool|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.add_bos, tok.eos_token_ids[0]) == (362, False, 361)
    ids = tok.encode("hi<think>fox<|tool|>")
    assert ids == [*sp.encode("hi"), 360, *sp.encode("fox"), 361]
    assert tok.is_special(361) and not tok.is_special(360)
    assert tok.decode(ids) == "hi<think>fox"
    assert tok.decode(ids, skip_special_tokens=False) == "hi<think>fox<|tool|>"


def _sp_token_type(sp, i: int) -> int:
    if sp.is_control(i):
        return gguf.TokenType.CONTROL
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    if sp.is_unused(i):
        return gguf.TokenType.UNUSED
    if sp.id_to_piece(i) == "<|user|>":
        return gguf.TokenType.USER_DEFINED
    return gguf.TokenType.NORMAL


def _write_gguf(path: Path, model: str | None, **fields) -> Path:
    writer = gguf.GGUFWriter(path, arch="llama")
    if model is not None:
        writer.add_tokenizer_model(model)
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def sp_gguf(sp, tmp_path_factory: pytest.TempPathFactory) -> Path:
    n = sp.get_piece_size()
    return _write_gguf(
        tmp_path_factory.mktemp("sp_gguf") / "tok.gguf",
        "llama",
        token_list=[sp.id_to_piece(i) for i in range(n)],
        token_scores=[sp.get_score(i) for i in range(n)],
        token_types=[_sp_token_type(sp, i) for i in range(n)],
        bos_token_id=sp.bos_id(),
        eos_token_id=sp.eos_id(),
        unk_token_id=sp.unk_id(),
        add_bos_token=True,
    )


def test_gguf_llama_vocab_matches_sentencepiece(sp_gguf: Path, sp) -> None:
    tok = load_tokenizer(sp_gguf)
    end = sp.piece_to_id("<|end|>")  # a control token named like an end of turn also stops
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos) == (1, (2, end), True)
    for text in [*SP_STRINGS, " ", "brûlée🦊"]:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    # As in llama.cpp, text after a control or user-defined token gets its own space prefix.
    user = sp.piece_to_id("<|user|>")
    assert tok.encode("<|user|> hi", add_bos=False) == [user, *sp.encode(" hi")]
    assert tok.encode("x<|user|>y", add_bos=False) == [*sp.encode("x"), user, *sp.encode("y")]
    assert tok.encode("<|end|>hi", add_bos=False) == [end, *sp.encode("hi")]


# --- tokenizer.json folder ----------------------------------------------------------------------

CHATML = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bpe")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # The folder's post-processor puts BOS first; no add_bos_token flag says so.
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", 0)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|bos|>", "eos_token": "<|im_end|>", "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    return folder


def test_tokenizer_json_folder(bpe_folder: Path) -> None:
    tok = load_tokenizer(bpe_folder)
    raw = tokenizers.Tokenizer.from_file(str(bpe_folder / "tokenizer.json"))
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos) == (0, (3, 1), True)
    assert tok.vocab_size == raw.get_vocab_size() > 300
    for text in ROUND_TRIP:
        ids = tok.encode(text)
        assert ids == [0, *raw.encode(text, add_special_tokens=False).ids]
        assert tok.decode(ids) == text
    assert len(tok.encode("tokenizer", add_bos=False)) == 1  # a corpus word became one token


def test_tokenizer_json_chat_template(bpe_folder: Path) -> None:
    tok = load_tokenizer(bpe_folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    unprefixed = tok.apply_chat_template(messages, add_generation_prompt=False, bos_token="")
    assert unprefixed == expected.removeprefix("<|bos|>")  # extra variables reach the template
    prompt = tok.apply_chat_template(messages)
    assert prompt == expected + "<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert ids.count(0) == 1 and ids.count(2) == 3 and ids.count(3) == 2
    with pytest.raises(ValueError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


# --- pre-tokenizer regex families ---------------------------------------------------------------


@pytest.mark.parametrize(
    "family, pieces",
    [
        ("gpt2", ["12345", "Ġhello", "'s", "ĊĊĠ", "Ġx"]),
        ("gpt2_digits", ["1", "2", "3", "4", "5", "Ġhello", "'s", "ĊĊĠ", "Ġx"]),
        ("llama3", ["123", "45", "Ġhello", "'s", "ĊĊ", "Ġ", "Ġx"]),
        ("qwen2", ["1", "2", "3", "4", "5", "Ġhello", "'s", "ĊĊ", "Ġ", "Ġx"]),
    ],
)
def test_pre_tokenizer_families(family: str, pieces: list[str]) -> None:
    got = byte_level_pre_tokenizer(family).pre_tokenize_str("12345 hello's\n\n  x")
    assert [p for p, _ in got] == pieces


# --- bad input ------------------------------------------------------------------------------------


def test_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer source"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="must be a .gguf"):
        load_tokenizer(tmp_path / "weights.bin")


def test_malformed_folder_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is malformed"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(tmp_path)


def test_corrupt_gguf(tmp_path: Path, sp_gguf: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_tokenizer(tmp_path / "junk.gguf")
    (tmp_path / "cut.gguf").write_bytes(sp_gguf.read_bytes()[:2000])
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_tokenizer(tmp_path / "cut.gguf")


def test_gguf_bad_tokenizer_fields(tmp_path: Path) -> None:
    tokens = ["<unk>", "a", "b", "ab"]
    with pytest.raises(ValueError, match="tokenizer.ggml.model is missing"):
        load_tokenizer(_write_gguf(tmp_path / "none.gguf", None))
    with pytest.raises(ValueError, match="tokenizer.ggml.model='bert'"):
        load_tokenizer(_write_gguf(tmp_path / "bert.gguf", "bert", token_list=tokens))
    with pytest.raises(ValueError, match="tokenizer.ggml.scores"):
        load_tokenizer(_write_gguf(tmp_path / "noscores.gguf", "llama", token_list=tokens))
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='mystery'"):
        gpt2 = {"token_list": tokens, "token_merges": ["a b"], "tokenizer_pre": "mystery"}
        load_tokenizer(_write_gguf(tmp_path / "pre.gguf", "gpt2", **gpt2))
    with pytest.raises(ValueError, match="eos_token_id=9 is outside"):
        gpt2 = {"token_list": tokens, "token_merges": ["a b"], "eos_token_id": 9}
        load_tokenizer(_write_gguf(tmp_path / "eos.gguf", "gpt2", tokenizer_pre="gpt2", **gpt2))

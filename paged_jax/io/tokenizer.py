"""Text <-> token ids for every model source: the `Tokenizer` facade and `load_tokenizer`.

This module owns the one tokenizer type the engine sees, whatever stored it:

- an HF model folder with ``tokenizer.json`` (run by the ``tokenizers`` package) or
  ``tokenizer.model`` (run by ``sentencepiece``), plus ``tokenizer_config.json``,
  ``generation_config.json`` and ``config.json`` for special ids, BOS policy and chat template;
- a ``.gguf`` file, whose metadata `paged_jax.io.gguf_tokenizer` turns into a ``tokenizers``
  pipeline.

BOS is added here, never by a backend's post-processor, so every source follows one rule:
``encode`` prepends BOS when asked to (default: the model's ``add_bos``) unless the text already
starts with it (a chat template that writes ``<s>`` itself), and never appends EOS.
Chat templates render in a sandboxed jinja2 environment set up the way HF transformers does.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

logger = logging.getLogger(__name__)

# Token texts that end a turn or a document in common vocabularies. A special token with one of
# these texts stops generation even when the model's config names only the main EOS.
END_OF_GENERATION_TEXTS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
)


class Backend(Protocol):
    """What `Tokenizer` needs from the library that actually splits text."""

    vocab_size: int
    special_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...


class TokenizersBackend:
    """A ``tokenizers.Tokenizer``; its added tokens flagged special are the special ids."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)


class Tokenizer:
    """Encode, decode and chat-format for one model; see the module docstring for the rules."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None = None,
        source: str = "",
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.add_bos = bool(add_bos and bos_token_id is not None)
        self.chat_template = chat_template
        self.source = source
        for name, i in [
            ("bos_token_id", bos_token_id),
            *(("eos_token_ids", e) for e in self.eos_token_ids),
        ]:
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"{source}: {name} {i} is outside the vocab of {self.vocab_size}")

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={self.eos_token_ids}, add_bos={self.add_bos})"
        )

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token texts inside it map to their ids. Never adds EOS."""
        ids = self.backend.encode(text)
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the vocab (a padded embedding's tail) decode to nothing."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.backend.decode(ids, skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.backend.special_ids

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template (a prompt string, not ids).

        ``template_vars`` reach the template as extra variables (e.g. ``enable_thinking``).
        Encode the result with ``add_bos=False`` when the template writes BOS itself.
        """
        if self.chat_template is None:
            raise ValueError(f"{self.source}: this tokenizer has no chat template")
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        variables |= template_vars
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{self.source}: chat template failed: {e}") from e


def end_of_generation_ids(backend: Backend, eos_ids: Iterable[int | None]) -> list[int]:
    """``eos_ids`` (configured, first = main EOS) plus special tokens that end a turn."""
    ids = [i for i in eos_ids if i is not None]
    for text in END_OF_GENERATION_TEXTS:
        i = backend.token_to_id(text)
        if i is not None and i in backend.special_ids:
            ids.append(i)
    return list(dict.fromkeys(ids))


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # Same environment HF transformers renders with, so prompts match the model's training.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class SentencePieceBackend:
    """A ``sentencepiece`` model, plus whole-match of its control pieces and of extra added tokens.

    SentencePiece itself never maps ``<s>`` written in text to its id; chat templates rely on
    that, so control pieces (and tokens that ``tokenizer_config.json`` adds past the model's own
    pieces) are cut out of the text first and the pieces between them encoded normally.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        added: dict[str, int] | None = None,
        added_special: Iterable[int] = (),
    ) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        num_pieces = self.sp.get_piece_size()
        controls = {self.sp.id_to_piece(i): i for i in range(num_pieces) if self.sp.is_control(i)}
        self.added = {**controls, **(added or {})}
        self.added_text = {i: t for t, i in self.added.items()}
        self.vocab_size = max([num_pieces - 1, *self.added.values()]) + 1
        unknown = [i for i in range(num_pieces) if self.sp.is_unknown(i)]
        self.special_ids = frozenset([*controls.values(), *unknown, *added_special])
        self._num_pieces = num_pieces
        longest_first = sorted(self.added, key=len, reverse=True)
        self._split = (
            re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if self.added else None
        )

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:  # odd parts are the matched added tokens
                ids.append(self.added[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids and skip_special_tokens:
                continue
            if i in self.added_text or i >= self._num_pieces:
                pieces.append(self.sp.decode(run))
                pieces.append(self.added_text.get(i, ""))
                run = []
            else:
                run.append(i)
        pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.added_text:
            return self.added_text[token_id]
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self._num_pieces else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells a token as a string or as a serialized AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    template = tok_cfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _load_hf_folder(folder: Path) -> Tokenizer:
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    gen_cfg = _read_json(folder / "generation_config.json")
    model_cfg = _read_json(folder / "config.json")
    backend: Backend
    if (folder / "tokenizer.json").is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a bare Exception on bad files
            raise ValueError(f"{folder / 'tokenizer.json'} is malformed: {e}") from e
        backend = TokenizersBackend(tok)
    elif (folder / "tokenizer.model").is_file():
        entries = [
            (int(i), t)
            for i, t in tok_cfg.get("added_tokens_decoder", {}).items()
            if isinstance(t, dict) and "content" in t
        ]
        added = {t["content"]: i for i, t in entries}
        special = [i for i, t in entries if t.get("special", True)]
        try:
            backend = SentencePieceBackend(folder / "tokenizer.model", added, special)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{folder / 'tokenizer.model'} is malformed: {e}") from e
    else:
        raise FileNotFoundError(f"{folder} has neither tokenizer.json nor tokenizer.model")

    def named_id(key: str) -> int | None:
        text = _token_text(tok_cfg.get(key))
        return None if text is None else backend.token_to_id(text)

    bos = named_id("bos_token")
    if bos is None:
        bos = (_id_list(gen_cfg.get("bos_token_id")) + _id_list(model_cfg.get("bos_token_id")))[:1]
        bos = bos[0] if bos else None
    if bos is None and isinstance(backend, SentencePieceBackend) and backend.sp.bos_id() >= 0:
        bos = backend.sp.bos_id()
    eos = [named_id("eos_token"), *_id_list(gen_cfg.get("eos_token_id"))]
    eos += _id_list(model_cfg.get("eos_token_id"))
    if isinstance(backend, SentencePieceBackend) and backend.sp.eos_id() >= 0:
        eos.append(backend.sp.eos_id())
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is None and isinstance(backend, TokenizersBackend):
        # No flag: the folder's post-processor says whether it puts BOS in front.
        with_specials = backend.tok.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and with_specials[:1] == [bos] != backend.encode("a")[:1]
    elif add_bos is None:
        add_bos = True  # sentencepiece models (Llama, Gemma) start with BOS unless told otherwise
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_ids=end_of_generation_ids(backend, eos),
        add_bos=bool(add_bos),
        chat_template=_chat_template(folder, tok_cfg),
        source=str(folder),
    )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of an HF model folder or of a ``.gguf`` file (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer source at {path}: expected a model folder or .gguf")
    if path.is_dir():
        return _load_hf_folder(path)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"{path}: a tokenizer file must be a .gguf; for HF, pass the folder")
    from paged_jax.io.gguf_tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(path)

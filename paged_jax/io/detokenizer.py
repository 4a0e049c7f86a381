"""Streaming detokenization: text for one sequence as its tokens arrive, one at a time.

Decoding each new token alone is wrong in two ways: byte-level and byte-fallback vocabularies
split one character over several tokens (an emoji is often 2-4), and SentencePiece-style
decoders drop or keep a leading space depending on what comes before. So each step decodes a
short window that starts a little before the new tokens (``prefix_offset``) twice, with and
without the tokens not yet emitted (from ``read_offset``), and emits the difference -- unless the
window's text ends in U+FFFD, the mark of an unfinished UTF-8 sequence; then it waits for more.

`IncrementalDetokenizer.text` is the generated text as it reads after the prompt, so it may
start with a space that ``tokenizer.decode(generated)`` alone would drop; without a prompt the
two agree. A character left unfinished at the end stays held back until `flush`.
"""

from __future__ import annotations

from collections.abc import Sequence

from paged_jax.io.tokenizer import Tokenizer

# Prompt tokens decoded as context ahead of the first generated one: enough to cover one
# character split over several tokens and any space handling at a word start.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text of one sequence, grown by `add` one token at a time."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = [int(i) for i in prompt_ids]
        # ids[prefix_offset:read_offset] was emitted already and is decoded again only as context;
        # ids[read_offset:] is not emitted yet.
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - PROMPT_CONTEXT_TOKENS, 0)
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (the generated part only)."""
        return "".join(self._chunks)

    def _decode(self, start: int, stop: int) -> str:
        return self.tokenizer.decode(
            self.ids[start:stop], skip_special_tokens=self.skip_special_tokens
        )

    def add(self, token_id: int) -> str:
        """Append one token; return only the text it completes ("" while a character is split)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (at the end of a sequence), U+FFFD included."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.ids))
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if delta:
            self._chunks.append(delta)
        return delta

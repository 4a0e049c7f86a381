"""A fake deterministic model behind the real host engine (driver + scheduler + KV cache
manager + bursts + stop handling), for fuzzing the host side without jax.

The fake "K/V" of a token is its id, written through the plan's page table into one flat array
of slots; every logit the fake model gives is a function of the tokens it reads back through
the page table, so a wrong page, a missed copy-on-write or a stray read of another sequence's
page changes the output. Pages no sequence holds (and that no prefix hit can read) are poisoned
with -1 before every step, as NaN would be on the device.

The model: the context hash is ``sum((token + 2) * W[position]) mod R``; the logits of a
context are row ``hash`` of a fixed random table. Sampling draws from
``softmax(logits / temperature)`` with a uniform keyed on (seed, output index) only, as the
real sampler does; temperature 0 takes the argmax. `reference` runs the same model on the true
tokens with no pages at all: the oracle a request's output must equal.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np

from paged_jax.driver import Driver
from paged_jax.engine.kv_cache import NULL_PAGE, KVCacheManager
from paged_jax.engine.plan import StepPlan
from paged_jax.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from paged_jax.engine.scheduler import Scheduler, SchedulerConfig
from paged_jax.engine.sequence import PLACEHOLDER
from paged_jax.metrics import EngineMetrics
from paged_jax.request import encode_prompt
from paged_jax.runtime.inflight import StepOutput

VOCAB = 32
EOS = 1
ALPHABET = "abcdefghijklmnopqrstuvwxyz012345"  # token id i decodes to ALPHABET[i]
MAX_LEN = 512  # longest context the fake model reads
_R = 4093  # rows of the logit table (a prime)
_rng = np.random.default_rng(20261202)
_W = _rng.integers(1, 2**20, size=MAX_LEN).astype(np.int64)
LOGITS = (_rng.standard_normal((_R, VOCAB)) * 2.5).astype(np.float64)
LOGPROBS = (LOGITS - np.log(np.exp(LOGITS).sum(axis=1, keepdims=True))).astype(np.float32)
TOP_IDS = np.argsort(-LOGPROBS, axis=1, kind="stable")[:, :MAX_LOGPROBS].astype(np.int32)
TOP = np.take_along_axis(LOGPROBS, TOP_IDS, axis=1)


class CharTokenizer:
    """One character per token; EOS is special (dropped with skip_special_tokens)."""

    chat_template = None

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return "".join(
            ("" if skip_special_tokens else "#") if i == EOS else ALPHABET[i] for i in ids
        )


def prefix_hashes(tokens: np.ndarray) -> np.ndarray:
    """Hash of every prefix: entry p is the hash of tokens[: p + 1]."""
    return np.cumsum((tokens.astype(np.int64) + 2) * _W[: len(tokens)]) % _R


def _uniform(seed: int, index: int) -> float:
    x = (seed * 0x9E3779B1 + (index + 1) * 0x85EBCA77) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    x ^= x >> 15
    return x / 2**32


def sample(h: int, temperature: float, seed: int, index: int) -> int:
    """The token drawn for output ``index`` of a request seeded ``seed`` after context ``h``."""
    if temperature == 0:
        return int(TOP_IDS[h, 0])
    z = LOGITS[h] / temperature
    p = np.exp(z - z.max())
    cdf = np.cumsum(p / p.sum())
    return int(min(np.searchsorted(cdf, _uniform(seed, index), side="right"), VOCAB - 1))


def _ranks(rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """vLLM's rank of each target in its row (1: the most likely)."""
    target = LOGPROBS[rows, targets]  # f32[N]
    return (LOGPROBS[rows] >= target[:, None]).sum(axis=1).astype(np.int32)


def entry(h: int, token_id: int, k: int) -> dict[int, float]:
    """Top-k {id: logprob} of context ``h`` plus ``token_id``'s own (the driver's layout)."""
    out = {int(t): float(v) for t, v in zip(TOP_IDS[h, :k], TOP[h, :k], strict=True)}
    out[int(token_id)] = float(LOGPROBS[h, token_id])
    return out


class FakeRunner:
    """Stands in for ``ModelRunner``: runs a plan on the fake model, checking on the way that
    the plan is one the device could run (pages owned, nothing written into a shared page)."""

    def __init__(self, kv_cache: KVCacheManager, config: SchedulerConfig, poison: bool = True):
        self.kv = kv_cache
        self.config = config
        self.cfg = types.SimpleNamespace(vocab_size=VOCAB)  # what the driver reads of the model
        self.poison = poison
        self.page_size = kv_cache.page_size
        self.slots = np.full(kv_cache.num_pages * self.page_size, -1, np.int64)
        self.last_timing = (0.0, 0.0, 0.0)
        self.num_steps = 0
        self.num_bursts = 0
        self.num_copies = 0

    def _context(self, page_ids: tuple[int, ...], kv_len: int) -> np.ndarray:
        pos = np.arange(kv_len)
        table = np.asarray(page_ids, np.int64)
        return self.slots[table[pos // self.page_size] * self.page_size + pos % self.page_size]

    def _write(self, page_ids: tuple[int, ...], position: int, token_ids) -> None:
        ps = self.page_size
        for j, token in enumerate(token_ids):
            page = page_ids[(position + j) // ps]
            assert page != NULL_PAGE, "a real token written into NULL_PAGE"
            assert self.kv.ref_count(page) == 1, f"write into shared page {page}"
            self.slots[page * ps + (position + j) % ps] = token

    def start(self, plan: StepPlan, token_masks=None, *, feed=None, masks_later=False):
        """Runs the plan at once (the fake device is synchronous); a row whose last input is
        a placeholder takes the sample of the step in flight, as ``runtime.feed`` does."""
        assert not masks_later  # the fuzz sends no grammars
        rows = feed[1] if feed else ()
        for row, item in enumerate(plan.scheduled):
            assert (item.token_ids[-1] == PLACEHOLDER) == (bool(rows) and rows[row] >= 0), item
        if feed:
            previous, rows = feed
            last = previous.output.sampled  # a burst: each row's sample of its own last step
            if previous.plan.num_steps:
                last = [last[r, n - 1] for r, n in enumerate(previous.plan.num_steps)]
            scheduled = tuple(
                item
                if r < 0
                else dataclasses.replace(item, token_ids=(*item.token_ids[:-1], int(last[r])))
                for item, r in zip(plan.scheduled, rows, strict=True)
            )
            plan = dataclasses.replace(plan, scheduled=scheduled)
        return types.SimpleNamespace(
            plan=plan,
            output=self.run(plan, token_masks),
            enqueued=0.0,
            previous_ready=True,
            idle_s=0.0,
            pack_s=0.0,
            dispatch_s=0.0,
            wait_s=0.0,
            last_exact=True,
        )

    def select(self, inflight, token_masks) -> None:
        raise AssertionError("the fuzz sends no grammars")

    def fetch(self, inflight) -> StepOutput:
        return inflight.output

    def run(self, plan: StepPlan, token_masks: dict | None = None) -> StepOutput:
        assert not token_masks  # the fuzz sends no grammars
        cfg, kv, ps = self.config, self.kv, self.page_size
        assert 0 < plan.num_seqs <= cfg.max_num_seqs
        assert plan.num_tokens <= cfg.max_num_batched_tokens
        self.num_steps += 1
        if self.poison:  # nothing may read a page no one holds and no hit can reach
            for page in kv.uncached_free_page_ids():
                self.slots[page * ps : (page + 1) * ps] = -1
        self.num_copies += len(plan.page_copies)
        for src, dst in plan.page_copies:
            assert kv.ref_count(dst) == 1 and src != NULL_PAGE
            self.slots[dst * ps : (dst + 1) * ps] = self.slots[src * ps : (src + 1) * ps]
        if plan.num_steps:
            return self._burst(plan)
        want_logprobs = any(i.params.logprobs is not None for i in plan.scheduled)
        want_prompt = any(i.prompt_targets for i in plan.scheduled)
        sampled = np.zeros(plan.num_seqs, np.int32)
        hashes = np.zeros(plan.num_seqs, np.int64)
        prompt_rows: list[tuple[np.ndarray, tuple[int, ...]]] = []
        for row, item in enumerate(plan.scheduled):
            assert tuple(item.page_ids) == kv.page_table(item.seq)
            assert len(item.page_ids) * ps >= item.kv_len
            self._write(item.page_ids, item.start_position, item.token_ids)
            h = prefix_hashes(self._context(item.page_ids, item.kv_len))
            if want_prompt:
                prompt_rows.append((h[item.start_position :], item.prompt_targets))
            hashes[row] = h[-1]
            if item.sample:
                t = item.params.temperature
                sampled[row] = sample(int(h[-1]), t, item.seed, item.sample_position)
        logprobs = None
        if want_logprobs:
            logprobs = {
                "target": LOGPROBS[hashes, sampled],
                "rank": _ranks(hashes, sampled),
                "top_ids": TOP_IDS[hashes],
                "top": TOP[hashes],
            }
        prompt_logprobs = None
        if want_prompt:
            hs = np.concatenate([h for h, _ in prompt_rows])
            targets = np.concatenate(
                [np.pad(np.asarray(t, np.int64), (0, len(h) - len(t))) for h, t in prompt_rows]
            )
            prompt_logprobs = {
                "target": LOGPROBS[hs, targets],
                "rank": _ranks(hs, targets),
                "top_ids": TOP_IDS[hs],
                "top": TOP[hs],
            }
        return StepOutput(sampled, logprobs, prompt_logprobs)

    def _burst(self, plan: StepPlan) -> StepOutput:
        """Each row feeds its token back ``num_steps[row]`` times; idle rows give junk."""
        self.num_bursts += 1
        sampled = np.full((plan.num_seqs, plan.burst_len), 10**6, np.int32)
        for row, (item, n) in enumerate(zip(plan.scheduled, plan.num_steps, strict=True)):
            assert item.num_new_tokens == 1 and item.sample
            assert tuple(item.page_ids) == self.kv.page_table(item.seq)
            token, kv_len = item.token_ids[0], item.kv_len
            for j in range(n):
                self._write(item.page_ids, kv_len - 1, [token])
                h = int(prefix_hashes(self._context(item.page_ids, kv_len))[-1])
                token = sample(h, item.params.temperature, item.seed, item.sample_position + j)
                sampled[row, j] = token
                kv_len += 1
        return StepOutput(sampled, None, None)


def make_driver(
    config: SchedulerConfig,
    *,
    num_pages: int,
    page_size: int,
    enable_prefix_caching: bool = True,
    poison: bool = True,
    eos_token_ids=(EOS,),
    async_scheduling: bool = True,
) -> Driver:
    kv = KVCacheManager(num_pages, page_size, enable_prefix_caching=enable_prefix_caching)
    scheduler = Scheduler(config, kv, eos_token_ids=eos_token_ids)
    tok = CharTokenizer()
    return Driver(
        scheduler,
        FakeRunner(kv, config, poison),
        EngineMetrics(kv),
        encode=lambda prompt: encode_prompt(tok, VOCAB, prompt, "fake"),
        tokenizer=tok,
        model_name="fake",
        async_scheduling=async_scheduling,
    )


def reference(
    prompt: list[int],
    params: SamplingParams,
    seed: int,
    max_model_len: int,
    eos_token_ids=(EOS,),
) -> dict:
    """What one completion must come out as: tokens, text, finish and stop reason, logprobs.

    Stops as vLLM has them: EOS (unless ignore_eos) then stop_token_ids, once min_tokens are
    out; then max_tokens or max_model_len; a stop string counts once min_tokens are out and
    only where it ends in the new token's text; the text is cut before it, its token kept.
    """
    tokens, out, text, lps = list(prompt), [], "", []
    tok = CharTokenizer()
    h = int(prefix_hashes(np.asarray(tokens))[-1])
    while True:
        token = sample(h, params.temperature, seed, len(out))
        if params.logprobs is not None:
            lps.append(entry(h, token, params.logprobs))
        tokens.append(token)
        out.append(token)
        h = int((h + (token + 2) * _W[len(tokens) - 1]) % _R)
        count, reason = len(out), None
        if count >= params.min_tokens:
            if not params.ignore_eos and token in eos_token_ids:
                reason = ("stop", None)
            elif token in (params.stop_token_ids or ()):
                reason = ("stop", token)
        if reason is None and (count >= params.max_tokens or len(tokens) >= max_model_len):
            reason = ("length", None)
        before = len(text)
        if params.detokenize:
            text += tok.decode([token], skip_special_tokens=params.skip_special_tokens)
        if params.stop_strings and count >= params.min_tokens:
            hits = [(text.find(s, max(0, before - len(s) + 1)), s) for s in params.stop_strings]
            hits = [hit for hit in hits if hit[0] >= 0]
            if hits:
                cut, stop = min(hits)
                reason, text = ("stop", stop), text[:cut]
        if reason is not None:
            return {
                "token_ids": out,
                "text": text,
                "finish_reason": reason[0],
                "stop_reason": reason[1],
                "logprobs": lps if params.logprobs is not None else None,
            }


def reference_prompt_logprobs(prompt: list[int], k: int) -> list[dict[int, float] | None]:
    hs = prefix_hashes(np.asarray(prompt))
    return [None] + [entry(int(hs[p - 1]), prompt[p], k) for p in range(1, len(prompt))]

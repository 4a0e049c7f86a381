"""Structured outputs on the bundled SmolLM2 (CPU): every JSON-schema output validates
(``jsonschema``), every regex / choice output matches, a trivial grammar leaves greedy decoding
unchanged, n > 1 and prefix caching keep each completion inside its grammar, bad words are
never completed, and a malformed or unsatisfiable schema fails its own request only.
"""

from __future__ import annotations

import json
import re

import pytest

from paged_jax import LLM, SamplingParams, StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "maxLength": 20},
        "quantity": {"type": "integer", "minimum": 1},
        "express": {"type": "boolean"},
        "size": {"enum": ["small", "medium", "large"]},
    },
    "required": ["item", "quantity", "express", "size"],
    "additionalProperties": False,
}
PEOPLE = [
    ("Alice", 34, "Paris"),
    ("Bob", 51, "Lagos"),
    ("Chen", 27, "Shanghai"),
    ("Dana", 45, "Toronto"),
    ("Emil", 19, "Berlin"),
    ("Farah", 62, "Cairo"),
    ("Goran", 38, "Zagreb"),
    ("Hana", 23, "Kyoto"),
    ("Ivan", 70, "Moscow"),
    ("Julia", 31, "Lima"),
]
ORDERS = [
    "two large coffees, express",
    "one small tea",
    "five medium pizzas, rush delivery",
    "a single large sofa",
    "three small boxes of nails, express",
    "eight medium shirts",
    "one large cake, as fast as possible",
    "four small plants",
    "six large tyres",
    "a medium backpack, express",
]


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    # one sequence bucket and two token buckets: few compiles (warmup off, as CI's budget asks)
    engine = LLM(
        "smollm2-135m",
        num_pages=96,
        max_model_len=160,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        warmup=False,
    )
    yield engine
    engine.close()


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_twenty_json_schema_requests_all_validate(llm):
    import jsonschema  # a dev dependency the GPU image lacks: import here

    prompts, params = [], []
    for name, age, city in PEOPLE:
        prompts.append(chat(f"{name} is {age} years old and lives in {city}. Give JSON."))
        params.append(
            SamplingParams(
                temperature=0,
                max_tokens=64,
                structured_outputs=StructuredOutputsParams(json=PERSON),
            )
        )
    for i, order in enumerate(ORDERS):
        prompts.append(chat(f"Order: {order}. Give the order as JSON."))
        params.append(
            SamplingParams(
                temperature=0.8, seed=i, max_tokens=64, structured_outputs={"json": ORDER}
            )
        )
    outs = llm.generate(prompts, params, use_tqdm=False)
    valid = 0
    for out, p in zip(outs, params, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), p.structured_outputs.json)
        valid += 1
    assert valid == 20
    # greedy extraction of a stated fact: the model copies the name and the age
    first = json.loads(outs[0].outputs[0].text)
    assert first["name"] == "Alice" and first["age"] == 34
    stats = llm.stats()
    assert stats["mask_steps"] > 0 and 0 < stats["mask_seconds"] / stats["mask_steps"] < 1.0


def test_regex_and_choice_requests_all_match(llm):
    pattern = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
    choices = ["positive", "negative", "neutral"]
    prompts = [chat(f"Write a name and a number, like 'Anna 7'. Example {i}.") for i in range(6)]
    prompts += [chat(t) for t in ("I love this!", "This is awful.", "It is a chair.", "Great!")]
    params = [
        SamplingParams(
            temperature=1.0,
            seed=i,
            max_tokens=16,
            structured_outputs=StructuredOutputsParams(regex=pattern),
        )
        for i in range(6)
    ] + [
        SamplingParams(
            temperature=0.0,
            max_tokens=8,
            structured_outputs=StructuredOutputsParams(choice=choices),
        )
        for _ in range(4)
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out in outs[:6]:
        assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text
    for out in outs[6:]:
        assert out.outputs[0].text in choices and out.outputs[0].finish_reason == "stop"


def test_trivial_grammar_equals_plain_greedy(llm):
    prompts = ["The capital of France is", "def fibonacci(n):"]
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    free = SamplingParams(
        temperature=0,
        max_tokens=12,
        ignore_eos=True,
        structured_outputs=StructuredOutputsParams(regex=r"(.|\n)*"),
    )
    want = llm.generate(prompts, plain, use_tqdm=False)
    got = llm.generate(prompts, free, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_n_completions_and_prefix_hits_stay_in_the_grammar(llm):
    prompt = chat("Pick a colour and a number.")
    so = StructuredOutputsParams(regex=r"(red|green|blue) [1-9]")
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, structured_outputs=so)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    hits = llm.stats()["prefix_cache_hits"]
    again = llm.generate([prompt], params, use_tqdm=False)[0]  # the prompt's pages are cached
    assert llm.stats()["prefix_cache_hits"] > hits
    for out in (first, again):
        assert len(out.outputs) == 3
        for c in out.outputs:
            assert re.fullmatch(r"(red|green|blue) [1-9]", c.text), c.text
    assert [c.text for c in first.outputs] == [c.text for c in again.outputs]


def test_bad_words_are_never_completed(llm):
    prompt = "The capital of France is"
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert "Paris" in llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].text
    banned = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, bad_words=["Paris"])
    text = llm.generate([prompt], banned, use_tqdm=False)[0].outputs[0].text
    assert "Paris" not in text


@pytest.mark.parametrize(
    ("so", "message"),
    [
        ({"json": {"type": "integer", "minimum": 5, "maximum": 3}}, "unsatisfiable"),
        ({"json": '{"type": '}, "not valid JSON"),
        ({"regex": "[a-"}, "regex"),
        ({"grammar": "start: missing_rule"}, "grammar"),
        ({"json": {"type": "string"}, "regex": "a"}, "exactly one"),
    ],
)
def test_bad_grammar_fails_its_request_only(llm, so, message):
    with pytest.raises(ValueError, match=message):
        llm.check_request("Hi", SamplingParams(structured_outputs=so))


def test_chat_is_generate_over_conversations(llm):
    """LLM.chat (vLLM's): one conversation or a list, the chat template applied."""
    conversation = chat("Name a colour.")
    params = SamplingParams(temperature=0, max_tokens=6)
    want = llm.generate([conversation], params, use_tqdm=False)[0]
    one = llm.chat(conversation, params, use_tqdm=False)
    two = llm.chat([conversation, chat("Name a fruit.")], params, use_tqdm=False)
    assert len(one) == 1 and len(two) == 2
    assert one[0].outputs[0].token_ids == two[0].outputs[0].token_ids == want.outputs[0].token_ids
    assert one[0].prompt.startswith("<|im_start|>")  # the ChatML template was applied
    with pytest.raises(ValueError, match="messages"):
        llm.chat([], params)


def test_include_stop_str_in_output(llm):
    prompt = "The capital of France is"
    cut, kept = (
        llm.generate(
            [prompt],
            SamplingParams(
                temperature=0, max_tokens=12, stop=["."], include_stop_str_in_output=include
            ),
            use_tqdm=False,
        )[0].outputs[0]
        for include in (False, True)
    )
    assert cut.text == " Paris" and kept.text == " Paris."
    assert cut.stop_reason == kept.stop_reason == "."


def test_async_scheduling_keeps_grammars_stops_and_tokens(llm):
    """Step n + 1 planned while step n runs: its masks are made after step n's tokens are
    fed to the grammars; the outputs equal the synchronous loop's, and the mask time overlaps
    the forward."""
    prompts = [chat(f"{n} is {a} years old and lives in {c}. Give JSON.") for n, a, c in PEOPLE[:3]]
    prompts += ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    so = StructuredOutputsParams(json=PERSON)
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=so)] * 2
    params.append(SamplingParams(temperature=0.9, seed=4, n=2, max_tokens=48,
                                 structured_outputs=so))  # fmt: skip
    params.append(SamplingParams(temperature=0, max_tokens=24, stop=[". ", "answer"]))
    params.append(SamplingParams(temperature=0.8, seed=1, max_tokens=24, bad_words=["city"]))
    params.append(SamplingParams(temperature=0, max_tokens=24, stop=["return"],
                                 include_stop_str_in_output=True))  # fmt: skip
    stepper = llm._driver.stepper
    results = {}
    for on in (False, True):
        stepper.async_scheduling = on
        hidden = llm.stats()["mask_hidden_seconds"]
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[on] = [
            [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs
        ]
        assert llm.stats()["mask_hidden_seconds"] > hidden  # masks made while the forward ran
    stepper.async_scheduling = True
    assert results[True] == results[False]
    assert stepper.num_pipelined > 0 and not stepper.in_flight

"""Tensor-parallel cases on 4 host-platform CPU devices, run by ``test_tensor_parallel.py`` in a
subprocess (the device count must be set before jax initialises, and the test process already
has jax on one device). Prints one JSON object: per case the engine's outputs and the dense
one-device oracle's, for the test to compare.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import paged_jax.build as build  # noqa: E402
from paged_jax import LLM, SamplingParams  # noqa: E402
from paged_jax.io.loader import LoadedModel  # noqa: E402
from paged_jax.io.weights import load_hf_dir  # noqa: E402
from paged_jax.model.dense import dense_logits  # noqa: E402
from paged_jax.model.presets import PRESETS, init_random_params  # noqa: E402

DATA = Path(__file__).parent / "data"
ENGINE = dict(
    page_size=4,
    num_pages=64,
    max_model_len=64,
    max_num_seqs=8,
    max_num_batched_tokens=16,
    warmup_progress=False,
)
GREEDY = SamplingParams(
    temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3, detokenize=False
)
PROMPTS = [[1, 5, 9, 33, 70, 2, 8, 11, 200], [7, 8, 100, 3]]  # ids < 256: tiny-qwen2's vocab


def oracle(params, cfg, prompt, result):
    """The dense (no cache, one device) model teacher-forced on the engine's continuation: its
    argmax and its log-softmax at the ids the engine reported, at each generated position."""
    continuation = result["tokens"][0]
    ids = jnp.asarray([prompt + continuation[:-1]], jnp.int32)
    logits = dense_logits(params, cfg, ids)[0, len(prompt) - 1 :]  # [n, V]
    logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return {
        "argmax": np.argmax(logprobs, axis=-1).tolist(),
        "logprobs": [
            {k: float(row[int(k)]) for k in got}
            for row, got in zip(logprobs, result["logprobs"][0], strict=True)
        ],
    }


def run_engine(model, tp, prompts, extra=(), **options):
    start = time.perf_counter()
    llm = LLM(model=model, tensor_parallel_size=tp, **{**ENGINE, **options})
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    result = {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "logprobs": [
            [{str(k): v.logprob for k, v in d.items()} for d in o.outputs[0].logprobs] for o in outs
        ],
        "kv_shards": len(llm._driver.runner.kv.k_pages[0].sharding.device_set),
    }
    if "features" in extra:  # prefix caching, n > 1 (seeded), decode bursts off and on
        again = llm.generate(prompts, GREEDY, use_tqdm=False)
        result["again"] = [o.outputs[0].token_ids for o in again]
        result["prefix_hits"] = llm.stats()["prefix_cache_hits"]
        sample = SamplingParams(n=2, temperature=0.9, seed=3, max_tokens=8, detokenize=False)
        result["sampled"] = [
            [c.token_ids for c in o.outputs] for o in llm.generate(prompts, sample, use_tqdm=False)
        ]
    result["compiles_after_warmup"] = llm.stats()["compiles_after_warmup"]
    llm.close()
    print(f"{model} tp={tp}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return result


def gpu_kernel_under_shard_map() -> float:
    """The Pallas GPU kernel (interpret mode) on 2 shards of the heads, against the float64
    oracle: the composition the GPU engine runs. Max |error| over the live rows."""
    from jax.sharding import PartitionSpec as P
    from kernel_cases import make_case, mixed_spec
    from kernel_cases import oracle as kernel_oracle

    from paged_jax.kernels import gpu
    from paged_jax.runtime import tp

    case = make_case(mixed_spec(8, 8, 4, 32, "float32"))
    fn = functools.partial(gpu.ragged_paged_attention, interpret=True, **case.kwargs())
    heads, pages, rest = P(None, tp.AXIS), P(tp.AXIS), (P(),) * 4
    sharded = jax.shard_map(
        fn,
        mesh=tp.make_mesh(2),
        in_specs=(heads, pages, pages, *rest),
        out_specs=heads,
        check_vma=False,
    )
    out = np.asarray(jax.jit(sharded)(*case.args()))
    n = int(case.cu_q_lens[case.num_seqs[0]])
    return float(np.max(np.abs(out[:n] - kernel_oracle(case)[:n])))


def lowered_for_accelerators() -> dict:
    """The tp 4 step of random:tiny lowered for CUDA (Pallas GPU kernel) and TPU (Mosaic) on
    this CPU: its collectives, control flow and the kernel's custom call."""
    from paged_jax.runtime import tp
    from paged_jax.runtime.buckets import Buckets
    from paged_jax.runtime.runner import ModelRunner

    cfg, mesh = PRESETS["tiny"], tp.make_mesh(4)
    params = tp.shard_params(init_random_params(cfg, jnp.bfloat16), cfg, mesh)
    out = {}
    for impl, platform, kernel in (("gpu", "cuda", "rpa_decode"), ("tpu", "tpu", "tpu_custom")):
        runner = ModelRunner(
            cfg,
            params,
            num_pages=16,
            page_size=16,
            max_pages_per_seq=4,
            buckets=Buckets.create(32, 8),
            kv_dtype=jnp.bfloat16,
            attn_impl=impl,
            mesh=mesh,
            platform=platform.replace("cuda", "gpu"),  # the kernel of that platform
        )
        traced = runner._steps["plain"].trace(runner.params, runner.kv, runner._inputs_spec(32, 8))
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        out[platform] = {
            "all_reduces": text.count("stablehlo.all_reduce"),
            "control_flow": [
                op for op in ("stablehlo.while", "stablehlo.case", "stablehlo.if") if op in text
            ],
            "kernel": kernel in text,
        }
    return out


def _without_tokenizer(load):
    """load_model, but the fixture checkpoints (no tokenizer files) load with tokenizer None."""

    def wrapped(model, dtype):
        if not Path(model).is_dir():
            return load(model, dtype)
        start = time.perf_counter()
        cfg, params = load_hf_dir(model, dtype)
        return LoadedModel(cfg, params, None, Path(model), time.perf_counter() - start)

    return wrapped


def main() -> None:
    assert len(jax.devices()) == 4, jax.devices()
    out = {"gpu_kernel_error": gpu_kernel_under_shard_map(), "lowered": lowered_for_accelerators()}
    for name, sizes in (("tiny", (1, 2, 4)), ("tiny-8kv", (2, 4))):
        cfg = PRESETS[name]
        params = init_random_params(cfg, jnp.float32)  # the weights random:<name> draws
        case = {}
        for tp in sizes:
            case[tp] = run_engine(f"random:{name}", tp, PROMPTS, extra=("features",))
        case["oracle"] = oracle(params, cfg, PROMPTS[0], case[sizes[-1]])
        out[name] = case
    build.load_model = functools.lru_cache(maxsize=1)(_without_tokenizer(build.load_model))
    # an HF safetensors checkpoint with qkv bias (Qwen2; 2 kv heads, replicated at tp 4)
    qwen2 = str(DATA / "tiny-qwen2")
    case = {4: run_engine(qwen2, 4, PROMPTS)}
    loaded = build.load_model(qwen2, "auto")
    case["oracle"] = oracle(loaded.params, loaded.config, PROMPTS[0], case[4])
    out["tiny-qwen2"] = case
    # the bundled SmolLM2 (9 q heads, 3 kv heads) at tp 3; one short prompt
    prompt = np.load(DATA / "logits_smollm2-135m.npz")["prompt_0"].tolist()
    case = {3: run_engine("smollm2-135m", 3, [prompt], warmup=False)}  # 0 compiles: above
    loaded = build.load_model("smollm2-135m", "auto")
    case["oracle"] = oracle(loaded.params, loaded.config, prompt, case[3])
    out["smollm2"] = case
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

"""Engine configuration: a frozen dataclass is the source of truth; yaml files and overrides
fill it.

A yaml file may name ``base_config: other.yaml`` (relative to itself); the base is read first
and the file's own keys override it, MaxText style. ``key=value`` overrides come last (values
parsed as yaml scalars). Unknown keys and a key set twice in one file or in the overrides are
errors naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

MIN_STEP_TOKENS = 8  # the smallest sequence bucket (runtime.buckets.MIN_SEQ_BUCKET)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m"  # bundled alias, HF directory or .gguf path
    dtype: str = "auto"  # params: auto (bf16 on GPU/TPU, f32 on CPU), float32, bfloat16, float16
    kv_dtype: str = "auto"  # KV pages: auto = the params' dtype
    page_size: int | None = None  # None: the chip table's on TPU (kernels/tpu_chips), else 16
    num_pages: int | None = None  # None: derive from the memory budget below
    kv_memory_fraction: float = 0.9  # of free accelerator memory after weights
    kv_cpu_bytes: int = 512 * 2**20  # KV byte budget on CPU
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    attn_impl: str = "auto"  # auto | reference | gpu | tpu
    reserve_full: bool = False  # contiguous mode: reserve max_model_len pages per request
    enable_prefix_caching: bool = True  # share cached full pages between requests
    compilation_cache_dir: str | None = None  # JAX persistent compilation cache
    warmup: bool = True  # precompile every bucket at start-up
    warmup_logprobs: bool = False  # also the logprobs / prompt_logprobs steps (eval runs)
    warmup_progress: bool = True  # a progress bar over the warmup compiles
    decode_steps: int = 8  # decode bursts: most decode steps per host round trip (1: off)
    # plan and pack step n + 1 while the device runs step n (same tokens; driver docstring)
    async_scheduling: bool = True
    # a burst of decode_steps steps as one executable (runtime/burst.py); None: off on CPU only
    fused_bursts: bool | None = None
    # send each step's inputs through pinned host memory, so that the step's call does not wait
    # for a host-to-device copy (runtime/wire.py); None: on GPU only
    pinned_inputs: bool | None = None
    # each step executable unpacks its own inputs: one executable call per step instead of
    # three (runtime/folded.py); None: on GPU only
    fold_inputs: bool | None = None
    seed: int = 0  # seeds unseeded requests (each still gets its own stream)
    tensor_parallel_size: int = 1  # shard the model over this many local devices (runtime/tp)
    batch_invariant: bool = False  # a request's tokens and logprobs bitwise whatever the batch

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # types first: LLM(**options) skips from_dict
            coerce_field(EngineConfig, f.name, getattr(self, f.name), "config")
        for name in (
            "page_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "kv_cpu_bytes",
            "decode_steps",
            "tensor_parallel_size",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_num_batched_tokens < MIN_STEP_TOKENS:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                f"{MIN_STEP_TOKENS}: the smallest compiled step holds {MIN_STEP_TOKENS} sequences"
            )
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages} must be >= 2 (page 0 is reserved)")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 1")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed} must be in [0, 2**32)")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction={self.kv_memory_fraction} must be in (0, 1]")
        if self.attn_impl not in ("auto", "reference", "gpu", "tpu"):
            raise ValueError(f"attn_impl={self.attn_impl!r} must be auto|reference|gpu|tpu")
        for name in ("dtype", "kv_dtype"):
            if getattr(self, name) not in ("auto", "float32", "bfloat16", "float16"):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} must be auto|float32|bfloat16|float16"
                )

    def replace(self, **changes: Any) -> EngineConfig:
        return from_dict({**dataclasses.asdict(self), **changes}, source="replace()")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a mapping key set twice."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise ValueError(f"key {key!r} is set twice (line {mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def coerce_field(cls: type, name: str, value: Any, where: str) -> Any:
    """``value`` checked against dataclass ``cls``'s field type, naming the key on error.

    An int is accepted for a float field and a list of str for a tuple field.
    """
    hint = typing.get_type_hints(cls)[name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
        if typing.get_origin(t) is tuple and isinstance(value, list | tuple):
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                break
            return tuple(value)
    raise ValueError(f"{where}: {name}={value!r} must be of type {hint}".replace("typing.", ""))


def from_dict(values: dict[str, Any], *, source: str = "config") -> EngineConfig:
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown config key(s) {unknown}; known: {sorted(fields)}")
    coerced = {k: coerce_field(EngineConfig, k, v, source) for k, v in values.items()}
    return EngineConfig(**coerced)


def merge_mappings(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``; nested mappings merge key by key."""
    out = dict(base)
    for k, v in child.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = merge_mappings(out[k], v) if nested else v
    return out


def read_yaml_chain(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A yaml file merged over its ``base_config`` chain; keys set twice in a file are errors."""
    path = path.resolve()
    if path in chain:
        raise ValueError(f"base_config cycle: {' -> '.join(map(str, chain + (path,)))}")
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid yaml: {e}") from None
    except ValueError as e:  # a key set twice
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of key: value")
    base = data.pop("base_config", None)
    if base is None:
        return data
    return merge_mappings(read_yaml_chain(path.parent / base, chain + (path,)), data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        if key in out:
            raise ValueError(f"override key {key!r} is set twice")
        try:
            out[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ValueError(f"override {key!r}: {raw!r} is not a yaml scalar: {e}") from None
    return out


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, **kwargs: Any
) -> EngineConfig:
    """yaml file (with its base_config chain), then ``key=value`` overrides, then kwargs."""
    values = read_yaml_chain(Path(path)) if path is not None else {}
    values.update(parse_overrides(overrides or []))
    values.update(kwargs)
    return from_dict(values, source=str(path) if path else "config")

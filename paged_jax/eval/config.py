"""Eval run configuration: frozen dataclasses are the source of truth. ``from_dict`` builds an
``EvalConfig`` from plain data (what a yaml file or a gin file yields, see ``loaders``), checking
every key and type and naming the dotted key in every error.

Plain data: top-level ``name, model, output, engine`` (``EngineConfig`` fields other than
``model``) and ``tasks`` (task name -> mapping with a ``type``: perplexity, multiple_choice or
generation, and that dataclass's fields).

Data paths are relative to the working directory; ``bundled:<file>`` names a file shipped in
``paged_jax/eval/data``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from paged_jax.config import EngineConfig, coerce_field
from paged_jax.config import from_dict as engine_from_dict

BUNDLED_PREFIX = "bundled:"
DATA_DIR = Path(__file__).parent / "data"
QA_TEMPLATE = "Question: {question}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class PerplexityTask:
    """Token-weighted perplexity of plain-text files, scored in rolling windows."""

    type: ClassVar[str] = "perplexity"
    paths: tuple[str, ...] = ()
    window: int | None = None  # tokens per window; None: the engine's max_model_len
    stride: int | None = None  # a window starts every stride tokens; None: window // 2
    add_bos: bool | None = None  # prepend BOS to each file; None: the tokenizer's default

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("paths must name at least one text file")
        if self.window is not None and self.window < 2:
            raise ValueError(f"window={self.window} must be >= 2")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride={self.stride} must be >= 1")


@dataclasses.dataclass(frozen=True)
class MultipleChoiceTask:
    """Log-likelihood of each choice given the question; acc and acc_norm (per character)."""

    type: ClassVar[str] = "multiple_choice"
    path: str = ""  # jsonl: {"question", "choices": [str, ...], "answer": int, "id"?}
    template: str = QA_TEMPLATE  # context; {question} is the record's question
    choice_prefix: str = " "  # put before each choice (the word's leading space)
    limit: int | None = None  # score only the first `limit` records

    def __post_init__(self) -> None:
        _check_common(self)


@dataclasses.dataclass(frozen=True)
class GenerationTask:
    """Greedy answers scored by exact match and by containment of a reference answer."""

    type: ClassVar[str] = "generation"
    path: str = ""  # jsonl: {"question", "answer": str | [str, ...], "id"?}
    template: str = QA_TEMPLATE
    num_fewshot: int = 0  # solved examples before each question: the first other records
    fewshot_separator: str = "\n\n"
    chat: bool = False  # send the prompt as one user message through the chat template
    max_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    limit: int | None = None

    def __post_init__(self) -> None:
        _check_common(self)
        if self.num_fewshot < 0:
            raise ValueError(f"num_fewshot={self.num_fewshot} must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")


def _check_common(task: MultipleChoiceTask | GenerationTask) -> None:
    if not task.path:
        raise ValueError("path must name a jsonl file")
    if "{question}" not in task.template:
        raise ValueError(f"template={task.template!r} must contain {{question}}")
    if task.limit is not None and task.limit < 1:
        raise ValueError(f"limit={task.limit} must be >= 1 or null")


Task = PerplexityTask | MultipleChoiceTask | GenerationTask
TASK_TYPES: dict[str, type] = {
    cls.type: cls for cls in (PerplexityTask, MultipleChoiceTask, GenerationTask)
}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    name: str = "eval"
    model: str = "smollm2-135m"  # bundled alias, HF directory or .gguf path
    output: str | None = None  # JSON result path; None: eval_results/<name>.json
    engine: EngineConfig = EngineConfig()  # its model is always `model`
    tasks: dict[str, Task] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: an eval config needs at least one task")
        if self.engine.model != self.model:
            raise ValueError(f"engine.model={self.engine.model!r} differs from {self.model=}")

    @property
    def output_path(self) -> Path:
        return Path(self.output or f"eval_results/{self.name}.json")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (the JSON result's echo); from_dict inverts it."""
        engine = dataclasses.asdict(self.engine)
        del engine["model"]
        tasks = {
            name: {"type": t.type, **_jsonable(dataclasses.asdict(t))}
            for name, t in self.tasks.items()
        }
        return {"name": self.name, "model": self.model, "output": self.output,
                "engine": engine, "tasks": tasks}  # fmt: skip


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def resolve_path(path: str) -> Path:
    """A data path: ``bundled:<file>`` is shipped with the package; else as given."""
    if path.startswith(BUNDLED_PREFIX):
        return DATA_DIR / path[len(BUNDLED_PREFIX) :]
    return Path(path).expanduser()


# ------------------------------------------------------------------ building and checking


def _build(cls: type, values: Any, source: str, prefix: str) -> Any:
    """``cls(**values)`` with every error naming ``source`` and the dotted key."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: {prefix} must be a mapping, got {values!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        keys = ", ".join(f"{prefix}.{k}" for k in unknown)
        raise ValueError(f"{source}: unknown key(s) {keys}; {prefix} knows {fields}")
    coerced = {k: coerce_field(cls, k, v, f"{source}: {prefix}") for k, v in values.items()}
    try:
        return cls(**coerced)
    except ValueError as e:
        raise ValueError(f"{source}: {prefix}: {e}") from None


def from_dict(values: dict[str, Any], *, source: str = "config") -> EvalConfig:
    """An EvalConfig from plain data; every error names the (dotted) key and the source."""
    values = dict(values)
    top = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(values) - top)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known: {sorted(top)}")
    engine = dict(values.pop("engine", None) or {})
    if "model" in engine:
        raise ValueError(f"{source}: engine.model: set the model with the top-level `model` key")
    tasks_in = values.pop("tasks", None) or {}
    if not isinstance(tasks_in, dict):
        raise ValueError(f"{source}: tasks must be a mapping of task name -> task")
    tasks = {}
    for task_name, task in tasks_in.items():
        where = f"tasks.{task_name}"
        task = dict(task) if isinstance(task, dict) else task
        kind = task.pop("type", None) if isinstance(task, dict) else None
        if kind not in TASK_TYPES:
            raise ValueError(f"{source}: {where}.type={kind!r} must be one of {list(TASK_TYPES)}")
        tasks[str(task_name)] = _build(TASK_TYPES[kind], task, source, where)
    model = values.get("model", EvalConfig.model)
    engine_cfg = engine_from_dict({**engine, "model": model}, source=f"{source}: engine")
    for key in ("name", "model", "output"):
        if key in values:
            values[key] = coerce_field(EvalConfig, key, values[key], source)
    try:
        return EvalConfig(**values, engine=engine_cfg, tasks=tasks)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None

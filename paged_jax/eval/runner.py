"""Run an ``EvalConfig``: build the engine (or take one), run each task, write the JSON result
and make the one-line summary.

The result: ``name``, ``model`` (name, arch, size), ``config`` (the config echo, which
``config.from_dict`` reads back), ``tasks`` (per task: type, metrics, counts, seconds,
throughput, samples), ``seconds``, ``load_seconds``, ``warmup_seconds``, ``engine_stats``,
``versions``, ``backend`` and ``date``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

from paged_jax.eval.config import EvalConfig
from paged_jax.eval.tasks import run_task

logger = logging.getLogger(__name__)

# the headline metric of each task type, for the summary line
HEADLINE = {
    "perplexity": ("perplexity",),
    "multiple_choice": ("acc", "acc_norm"),
    "generation": ("exact_match", "contains"),
}


def build_llm(cfg: EvalConfig) -> Any:
    from paged_jax.llm import LLM

    return LLM(**dataclasses.asdict(cfg.engine))


def run_eval(
    cfg: EvalConfig, llm: Any = None, *, progress: bool = True, write: bool = True
) -> dict[str, Any]:
    """Run every task of ``cfg`` on ``llm`` (built from ``cfg.engine`` when None); returns the
    result and, with ``write``, saves it as JSON at ``cfg.output_path``."""
    import jax

    import paged_jax

    if llm is None:
        llm = build_llm(cfg)
    elif llm.config.model != cfg.model:
        raise ValueError(f"the engine serves {llm.config.model!r}, the config names {cfg.model!r}")
    start = time.perf_counter()
    tasks: dict[str, Any] = {}
    for name, task in cfg.tasks.items():
        logger.info("task %s (%s)", name, task.type)
        before = llm.stats()
        task_start = time.perf_counter()
        result = run_task(llm, task, progress=progress)
        seconds = time.perf_counter() - task_start
        after = llm.stats()
        tokens = after["scheduled_tokens"] - before["scheduled_tokens"]
        tasks[name] = {
            "type": task.type,
            "metrics": result.metrics,
            "counts": result.counts,
            "seconds": seconds,
            "scheduled_tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "output_tokens_per_s": (after["output_tokens"] - before["output_tokens"]) / seconds
            if seconds
            else 0.0,
            "samples": result.samples,
        }
    cfg_model = llm.model_config
    result = {
        "name": cfg.name,
        "model": {
            "name": cfg.model,
            "arch": cfg_model.arch,
            "num_layers": cfg_model.num_layers,
            "vocab_size": cfg_model.vocab_size,
        },
        "config": cfg.to_dict(),
        "tasks": tasks,
        "seconds": time.perf_counter() - start,
        "load_seconds": getattr(llm, "load_seconds", 0.0),
        "warmup_seconds": getattr(llm, "warmup_seconds", 0.0),
        "engine_stats": llm.stats(),
        "versions": {
            "paged_jax": paged_jax.__version__,
            "jax": jax.__version__,
            "python": platform.python_version(),
        },
        "backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if write:
        write_result(result, cfg.output_path)
    return result


def _clean(value: Any) -> Any:
    """NaN/inf as null: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_result(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=2, ensure_ascii=False) + "\n")
    logger.info("wrote %s", path)


def summary_line(result: dict[str, Any], path: Path | None = None) -> str:
    """``eval <name> <model>: task metric=value ... (n) | ... | 12.3s [-> path]``"""
    parts = []
    for name, task in result["tasks"].items():
        metrics = " ".join(f"{key}={task['metrics'][key]:.4g}" for key in HEADLINE[task["type"]])
        counts = task["counts"]
        n = counts.get("scored_tokens", counts.get("questions"))
        unit = "tok" if "scored_tokens" in counts else "q"
        parts.append(f"{name} {metrics} ({n} {unit}, {task['seconds']:.1f}s)")
    line = f"eval {result['name']} {result['model']['name']}: " + " | ".join(parts)
    line += f" | total {result['seconds']:.1f}s"
    return line + (f" -> {path}" if path is not None else "")

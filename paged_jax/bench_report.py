"""The benchmark's metrics and writers (``paged_jax.bench``): host overhead, step cost
components and decode MBU from the engine's step timeline, the binned series for the plot, and
the JSON / markdown / PNG files of a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def dist(values: Any, percentiles: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"mean": None, **{f"p{p}": None for p in percentiles}}
    out = {"mean": float(a.mean())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in percentiles})
    return out


def finite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def timeline_metrics(llm: Any, limit_bytes_per_s: float | None) -> dict[str, Any]:
    """Host overhead, per-step cost components and decode MBU from ``llm.timeline``."""
    steps, stats = llm.timeline, llm.stats()
    parts = ("schedule_s", "pack_s", "dispatch_s", "device_wait_s", "update_s")
    step_s = np.array([r.step_s for r in steps])
    num_steps = sum(r.num_steps for r in steps)  # engine steps (a burst has several)
    sums = {p: float(np.sum([getattr(r, p) for r in steps])) for p in parts}
    sums["other_s"] = float(step_s.sum()) - sum(sums.values())
    means = {p: v / num_steps for p, v in sums.items()}  # per engine step
    # Host-only time: the device waited for the host (``StepRecord.idle_s``, an upper bound;
    # without async scheduling about schedule + pack + update + other). Host work is the
    # host's own share, hidden behind the device's when async scheduling overlaps them.
    host_s = float(np.sum([r.idle_s for r in steps]))
    work_s = sums["schedule_s"] + sums["pack_s"] + sums["update_s"] + sums["other_s"]
    # A decode step reads every weight once except the embedding table, of which it gathers
    # a few rows (tied embeddings are read whole, as the lm head).
    weight_bytes = stats["param_bytes"]
    if not llm.model_config.tie_word_embeddings:
        weight_bytes -= stats["embed_bytes"]
    kv_bytes_per_token = stats["kv_bytes_per_token"]
    # Decode-only records: one-token steps and bursts (a burst's counts add up its steps).
    decode = [r for r in steps if r.num_tokens == r.num_seqs * r.num_steps]
    decode_bytes = sum(
        r.num_steps * weight_bytes + r.num_kv_tokens * kv_bytes_per_token for r in decode
    )
    decode_s = sum(r.step_s for r in decode)
    device_s = sum(r.dispatch_s + r.device_wait_s for r in decode)
    mbu = mbu_device = None
    if decode and limit_bytes_per_s:
        # tensor parallel: against the devices' summed limit (replicated params counted once)
        limit_bytes_per_s *= llm.config.tensor_parallel_size
        mbu = decode_bytes / decode_s / limit_bytes_per_s
        mbu_device = decode_bytes / device_s / limit_bytes_per_s
    # where the device waited: bursts, single decode steps, steps with prefill tokens; with
    # the host's own seconds in each (schedule, pack, dispatch, update)
    fields = ("step_s", "idle_s", "schedule_s", "pack_s", "dispatch_s", "update_s")
    by_kind = {k: dict.fromkeys(("records", *fields), 0) for k in ("burst", "decode", "mixed")}
    for r in steps:
        kind = "burst" if r.num_steps > 1 else "decode" if r.num_tokens == r.num_seqs else "mixed"
        by_kind[kind]["records"] += 1
        for f in fields:
            by_kind[kind][f] += getattr(r, f)
    return {
        "host_overhead_share": host_s / float(step_s.sum()),
        "idle_by_kind": by_kind,
        "host_work_share": max(0.0, work_s) / float(step_s.sum()),
        "dispatch_share": sums["dispatch_s"] / float(step_s.sum()),
        "step_mean_s": float(step_s.sum()) / num_steps,
        "step_component_mean_s": means,
        "biggest_step_costs": sorted(means, key=means.__getitem__, reverse=True)[:3],
        "decode": {
            "steps": sum(r.num_steps for r in decode),
            "bursts": sum(r.num_steps > 1 for r in decode),
            "step_s": dist([r.step_s / r.num_steps for r in decode]),
            "mean_num_seqs": float(np.mean([r.num_seqs for r in decode])) if decode else 0.0,
            "weight_bytes_per_step": int(weight_bytes),
            "kv_bytes_per_token": int(kv_bytes_per_token),
            "bytes_per_s": decode_bytes / decode_s if decode else None,
            "mbu": mbu,  # (weight + K/V bytes read) / step time / streaming limit
            "mbu_device": mbu_device,  # the same over dispatch + device wait only
        },
    }


def series(llm: Any, start: float, max_points: int = 120) -> dict[str, list[float]]:
    """The timeline in time bins (about 5 steps each, at most ``max_points``): tokens/s, pages
    in use, sequences; None for a bin without steps."""
    steps = llm.timeline
    t = np.array([r.time - start for r in steps])
    num_bins = max(1, min(max_points, len(steps) // 5))
    edges = np.linspace(0.0, max(float(t[-1]), 1e-9), num_bins + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)
    width = np.diff(edges)

    def per_bin(values: list[float], reduce: str) -> list[float | None]:
        v = np.asarray(values, dtype=np.float64)
        sums, counts = np.bincount(idx, v, len(width)), np.bincount(idx, None, len(width))
        out = (
            sums / width
            if reduce == "rate"
            else np.where(counts, sums / np.maximum(counts, 1), np.nan)
        )
        return finite([round(float(x), 4) for x in out])

    num_pages = llm.stats()["num_pages"]
    return {
        "t_s": [round(float(x), 4) for x in edges[1:]],
        "tokens_per_s": per_bin([r.num_tokens for r in steps], "rate"),
        "output_tokens_per_s": per_bin([r.num_sampled for r in steps], "rate"),
        "used_pages_frac": per_bin([r.num_used_pages / num_pages for r in steps], "mean"),
        "num_seqs": per_bin([r.num_seqs for r in steps], "mean"),
    }


def _ms(d: dict[str, float | None]) -> str:
    return " / ".join("n/a" if d[k] is None else f"{1e3 * d[k]:.1f}" for k in ("p50", "p90", "p99"))


def _limit(c: dict[str, Any] | None) -> str:
    if not c:
        return "n/a"
    gb = {k: c[k] / 1e9 for k in ("bytes_per_s", "copy_bytes_per_s", "read_bytes_per_s")}
    return f"{gb['bytes_per_s']:.0f} ({gb['copy_bytes_per_s']:.0f} / {gb['read_bytes_per_s']:.0f})"


def to_markdown(r: dict[str, Any]) -> str:
    w, dec = r["workload"], r["decode"]
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
    comps = ", ".join(f"{k[:-2]} {1e3 * v:.2f}" for k, v in r["step_component_mean_s"].items())
    rows = [
        ("requests/s", f"{r['requests_per_s']:.2f}"),
        ("output tok/s", f"{r['output_tokens_per_s']:.1f}"),
        ("total tok/s (prompt + output)", f"{r['total_tokens_per_s']:.1f}"),
        ("TTFT p50 / p90 / p99 (ms)", _ms(r["ttft_s"])),
        ("TPOT p50 / p90 / p99 (ms)", _ms(r["tpot_s"])),
        ("KV utilization (tokens / allocated slots, mean)", f"{r['kv_utilization']:.3f}"),
        ("pages in use, mean / max (of num_pages)",
         f"{r['used_pages_frac']['mean']:.3f} / {r['used_pages_frac']['max']:.3f}"),
        ("num_pages x page_size (KV GiB)",
         f"{r['num_pages']} x {r['page_size']} ({r['kv_cache_gib']:.3g})"),
        ("max sequences in a step", str(r["max_num_seqs_in_step"])),
        ("preemptions", str(r["preemptions"])),
        ("prefix cache: hit tokens / queried (rate)",
         f"{r['prefix_cache']['hits']} / {r['prefix_cache']['queries']} "
         f"({r['prefix_cache']['hit_rate']:.3f})"),
        ("prompt tokens computed", str(r["prompt_tokens_computed"])),
        ("decode MBU of the streaming limit (step / device time)",
         f"{fmt(dec['mbu'], '.3f')} / {fmt(dec['mbu_device'], '.3f')}"),
        ("streaming limit (GB/s; copy / read)", _limit(r["copy"])),
        ("decode steps (in bursts), mean sequences",
         f"{dec['steps']} ({dec['bursts']}), {dec['mean_num_seqs']:.1f}"),
        ("host-only (device idle) / host work / dispatch share of step time",
         f"{r['host_overhead_share']:.3f} / {r['host_work_share']:.3f} / "
         f"{r['dispatch_share']:.3f}"),
        ("device idle s / step s (records): bursts, decodes, prefill or mixed", ", ".join(
            f"{v['idle_s']:.3f} / {v['step_s']:.3f} ({v['records']})"
            for v in r["idle_by_kind"].values())),
        ("step mean (ms) and components", f"{1e3 * r['step_mean_s']:.2f}: {comps}"),
        ("three biggest step costs", ", ".join(k[:-2] for k in r["biggest_step_costs"])),
        ("compiles after warmup", str(r["compiles_after_warmup"])),
        ("warmup s (buckets)", f"{r['warmup_seconds']:.1f} ({r['warmup_buckets']})"),
    ]  # fmt: skip
    tag = " - " + r["tag"] if r["tag"] else ""
    head = (
        f"### {r['engine_options']['model']} ({r['mode']}){tag}\n\n"
        f"{r['device']}, jax {r['jax_version']}, {r['date']}. {w['num_requests']} requests "
        f"({w['source']}, seed {r['args']['seed']}): prompt mean {w['prompt_len']['mean']:.0f} "
        f"(max {w['prompt_len']['max']}), output mean {w['output_len']['mean']:.0f} "
        f"(max {w['output_len']['max']}) tokens, ignore_eos, greedy; {r['seconds']:.1f} s.\n\n"
    )
    table = "| metric | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    return head + table


def write_plot(r: dict[str, Any], path: Path) -> bool:
    """Throughput and KV pages in use over time; False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written")
        return False
    s = {k: [np.nan if v is None else v for v in vs] for k, vs in r["series"].items()}
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    top.plot(s["t_s"], s["tokens_per_s"], label="scheduled tok/s (prompt + output)")
    top.plot(s["t_s"], s["output_tokens_per_s"], label="output tok/s")
    top.set_ylabel("tokens / s")
    top.legend(loc="upper right")
    top.set_title(f"{r['engine_options']['model']} ({r['mode']}), {r['device']}")
    bottom.plot(s["t_s"], [100 * x for x in s["used_pages_frac"]], color="C2")
    bottom.set_ylabel("KV pages in use (%)")
    bottom.set_ylim(0, 105)
    bottom.set_xlabel("seconds")
    seqs = bottom.twinx()
    seqs.plot(s["t_s"], s["num_seqs"], color="C3", alpha=0.6)
    seqs.set_ylabel("sequences per step", color="C3")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(r: dict[str, Any], out_dir: str, stem: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    timeline = r.get("timeline")
    r = {k: v for k, v in r.items() if k != "timeline"}
    paths[0].write_text(json.dumps(finite(r), indent=1) + "\n")
    paths[1].write_text(to_markdown(r))
    if write_plot(r, out / f"{stem}.png"):
        paths.append(out / f"{stem}.png")
    if timeline is not None:
        paths.append(out / f"{stem}.timeline.jsonl")
        paths[-1].write_text("".join(json.dumps(row) + "\n" for row in timeline))
    return paths

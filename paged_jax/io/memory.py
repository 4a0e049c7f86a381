"""Will the model fit? The weights' bytes from the config alone (shapes traced, nothing
allocated), checked against the accelerator's free memory before any weight is placed, so a
model too large fails with both sizes instead of an allocator error half-way through."""

from __future__ import annotations

import functools
import math

import jax

from paged_jax.model.config import ModelConfig
from paged_jax.model.presets import init_random_params
from paged_jax.runtime.state import free_device_bytes


def model_bytes(cfg: ModelConfig, dtype: jax.typing.DTypeLike) -> int:
    """Bytes of the params of ``cfg`` in ``dtype`` (the same tree every loader builds)."""
    shapes = jax.eval_shape(functools.partial(init_random_params, cfg, dtype))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))


def check_fits_device(cfg: ModelConfig, dtype: jax.typing.DTypeLike, model: str) -> None:
    """ValueError naming both sizes when the weights cannot fit the free accelerator memory
    (not checked on CPU, where the backend reports no limit). The device is where the weights
    go: the default device (tensor parallel stages a model too large for one device on the
    host, then places it shard by shard; that is not checked here)."""
    staged = jax.config.jax_default_device
    if staged is not None and getattr(staged, "platform", None) == "cpu":
        return
    free = free_device_bytes()
    if free is None:
        return
    need = model_bytes(cfg, dtype)
    if need > free:
        device = jax.local_devices()[0]
        raise ValueError(
            f"model={model!r} needs {need / 2**30:.2f} GiB for its weights in "
            f"{jax.numpy.dtype(dtype).name}, more than the {free / 2**30:.2f} GiB free on "
            f"{device.device_kind}: choose a smaller model or dtype"
        )

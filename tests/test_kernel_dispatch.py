"""Backend dispatch: auto picks by default backend, unknown impls are rejected."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from kernel_cases import decode_spec, make_case

import paged_jax.kernels as kernels
from paged_jax.kernels import reference


def test_auto_on_cpu_is_reference() -> None:
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU mapping")
    assert kernels.resolve_impl("auto") == "reference"
    case = make_case(decode_spec(8, 4, 2, 64, "float32"))
    out = kernels.ragged_paged_attention(*case.args(), sm_scale=case.sm_scale)
    ref = reference.ragged_paged_attention(*case.args(), sm_scale=case.sm_scale)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_unknown_impl_raises() -> None:
    with pytest.raises(ValueError, match="impl="):
        kernels.resolve_impl("cuda")
    case = make_case(decode_spec(8, 4, 2, 64, "float32"))
    with pytest.raises(ValueError, match="impl="):
        kernels.ragged_paged_attention(*case.args(), sm_scale=1.0, impl="triton")


def test_write_kv_reexported() -> None:
    assert kernels.write_kv is reference.write_kv


@pytest.mark.parametrize("impl", ["reference", "tpu", "gpu"])
def test_explicit_impls_resolve(impl: str) -> None:
    assert kernels.resolve_impl(impl, platform="tpu") == impl
    # off a TPU the Mosaic kernel runs in its interpreter; the others are what they say
    assert kernels.resolve_impl(impl) == ("tpu_interpret" if impl == "tpu" else impl)
    assert kernels.resolve_impl("auto", platform="tpu") == "tpu"
    assert kernels.resolve_impl("auto", platform="gpu") == "gpu"


def test_decode_only_steps_run_the_decode_variant() -> None:
    from paged_jax.runtime.dispatch import _step_variant

    class Plan:  # the two counts _step_variant reads
        def __init__(self, num_tokens: int, num_seqs: int) -> None:
            self.num_tokens, self.num_seqs = num_tokens, num_seqs

    assert _step_variant(Plan(5, 5), (8, 8), False, True) == "decode"
    assert _step_variant(Plan(6, 5), (8, 8), False, True) == "plain"  # a chunk
    assert _step_variant(Plan(5, 5), (16, 8), False, True) == "plain"  # T != S
    assert _step_variant(Plan(5, 5), (8, 8), True, True) == "prompt"
    assert _step_variant(Plan(5, 5), (8, 8), False, False) == "plain"  # not the GPU kernel

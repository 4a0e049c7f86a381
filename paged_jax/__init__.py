"""paged_jax: a PagedAttention LLM inference engine in JAX."""

from paged_jax.engine.outputs import CompletionOutput, RequestOutput
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.llm import LLM

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

"""pagedjax: PagedAttention and vLLM-style KV-cache memory management in JAX/Pallas.

Layers, in the one direction data flows:
  host manager (block_allocator, block_manager, scheduler)  ->  step plan (numpy)
  -> device state (kv_cache: immutable pytree of KV pages, donated into jitted steps)
  -> jitted Flax steps (model) calling one attention dispatch (attention: xla | pallas).
`LLM` (engine) ties them together behind vLLM's offline and streaming APIs.
"""

from pagedjax.core.block_allocator import BlockAllocator
from pagedjax.core.block_manager import BlockManager, NoFreeBlocksError, SequenceStateError
from pagedjax.entrypoints.llm import LLM
from pagedjax.outputs import CompletionOutput, RequestOutput
from pagedjax.sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "LLM",
    "BlockAllocator",
    "BlockManager",
    "CompletionOutput",
    "NoFreeBlocksError",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "SequenceStateError",
]

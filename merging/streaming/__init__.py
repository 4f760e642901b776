"""The streamed merge: sparse methods computed from the LoRA factors, block by block.

Read top to bottom (DESIGN.md, Merging):

- ``plans``: what is done for a method — built only from its ``MergeMethod`` fields
  (``sparsifier``, ``consensus``, ``streamable``); ``supports`` says whether it is streamed.
- ``selection``: row blocks, exact top-k thresholds and random keep masks, without a dense τ_i.
- ``single_pass``: the mix of all adapters, row block by row block (``merge_dense``): one fused
  pass for plain top-k with sign election, else a stats pass then the mix.
- ``projection``: adapter output — the merged update re-factorised to low rank without forming
  it (``merge_factors``), ``--rank auto`` and ``--refactor best``.
- ``threads``: worker threads and single-threaded torch ops inside them.

The element-wise work is done by the numba kernels of ``merging/kernels.py``.
"""

from . import plans, projection, selection, single_pass, threads
from .plans import supports
from .projection import merge_factors
from .selection import TopK, row_blocks
from .single_pass import merge_dense
from .threads import default_workers, single_threaded_ops

__all__ = [
    "TopK",
    "default_workers",
    "merge_dense",
    "merge_factors",
    "plans",
    "projection",
    "row_blocks",
    "selection",
    "single_pass",
    "single_threaded_ops",
    "supports",
    "threads",
]

# internals the tests drive directly (tests/merging/test_streaming.py)
from .selection import _EXACT_BELOW, _Z, _stats_magnitude  # noqa: E402, F401
from .single_pass import _Stream  # noqa: E402, F401

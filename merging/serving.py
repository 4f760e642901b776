"""What serving a merged adapter with vLLM needs: its ``--max-lora-rank``.

Exact merges sum ranks (linear / task arithmetic: Σ rᵢ; ``--reference previous`` doubles the
terms of continued stages), while vLLM's ``max_lora_rank`` defaults to 16 and accepts only the
values of ``MaxLoRARanks`` in ``vllm/config/lora.py`` (vLLM 0.1x): an adapter of higher rank is
refused when it is loaded. The values are copied here, since vLLM is not a dependency.
"""

from __future__ import annotations

#: vLLM's accepted ``--max-lora-rank`` values (``vllm/config/lora.py``, ``MaxLoRARanks``)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: vLLM's default ``max_lora_rank``
VLLM_DEFAULT_MAX_LORA_RANK = 16


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts for an adapter of ``rank``; None above 512."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


def vllm_note(rank: int, *, modules_to_save: bool = False) -> str:
    """``"; vLLM: ..."`` for a summary line, or ``""`` when vLLM's defaults serve the adapter."""
    if modules_to_save:
        return "; vLLM cannot serve it as a LoRA (modules_to_save): serve the --output full merge"
    if rank <= VLLM_DEFAULT_MAX_LORA_RANK:
        return ""
    needed = vllm_max_lora_rank(rank)
    if needed is None:
        return (
            f"; above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}: re-factorise "
            f"with --rank {VLLM_MAX_LORA_RANKS[-1]} or serve the --output full merge"
        )
    return f"; vLLM needs --max-lora-rank {needed}"

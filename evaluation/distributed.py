"""Data-parallel evaluation: under ``accelerate launch``, each process scores a share of a split.

    accelerate launch --multi_gpu --num_processes 8 -m emomerge evaluate ...   # or emomerge run

Samples are dealt out by group (the EmoComics35 page), so a page's utterances stay together and
its image is encoded once (page-cached scoring). Each process appends its raw outputs to its own
part of the prediction cache (``<variant>.<hash>.part<rank>.jsonl``); after a barrier every
process reads all parts, so the decisions (thresholds, metrics, intervals) are computed from the
same predictions as a one-process run, and only the main process writes the leaderboard. A
killed process leaves its part as far as its last flushed batch: the re-run (with any number of
processes) reads every part and scores only what is missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> int | None:
        """The prediction-cache part this process appends to (None: the one file)."""
        return self.rank if self.world > 1 else None

    def take(self, samples: Sequence[Any]) -> list[Any]:
        """This process's samples: whole groups, the k-th distinct group going to k mod world."""
        if self.world == 1:
            return list(samples)
        order: dict[Any, int] = {}
        for s in samples:
            order.setdefault(getattr(s, "group", s.id), len(order))
        return [s for s in samples if order[getattr(s, "group", s.id)] % self.world == self.rank]

    def barrier(self) -> None:
        """Wait until every process got here (a no-op for one process)."""
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()  # the state current_shard() initialised


def current_shard() -> Shard:
    """The shard of this process: from accelerate's process group when launched with more than
    one process (``WORLD_SIZE`` > 1), else the whole split."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    # joins the process group: NCCL on GPUs; without them gloo, which accelerate sets up only
    # when told the run is on CPU (as training's Accelerator(cpu=True) does)
    state = PartialState(cpu=not torch.cuda.is_available())
    return Shard(state.process_index, state.num_processes)

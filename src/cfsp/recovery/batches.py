"""Which examples each process trains on at each step: one global order, split by position.

The data of a run is one sequence of examples: a loaded set is shuffled afresh each pass (seeded,
so a run is reproducible), a streamed corpus is read in order. A step takes the next
``world x grad_accum x batch_size`` examples of it; micro-batch ``m`` of process ``r`` is the
``(m x world + r)``-th group of ``batch_size``. One process with ``world`` times the accumulation
sees the same examples per step in the same groups, so a data-parallel run trains on what a
single process would, and a checkpoint's position (``step x examples per step``) means the same on
any process count.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import torch

from cfsp.recovery.data import IGNORE_INDEX, PadCollator, RecoveryDataset
from cfsp.recovery.stream import TextStream


def global_examples(
    data: RecoveryDataset | TextStream, seed: int, held_out: int, start: int
) -> Iterator[dict[str, list[int]]]:
    """The run's examples from global position ``start`` on, endlessly, without the held-out ones.

    A loaded set holds its first ``held_out`` examples back; a stream does that itself.
    """
    if isinstance(data, TextStream):
        yield from islice(iter(data), start, None)
        return
    count = len(data) - held_out
    position = start
    while True:
        epoch, offset = divmod(position, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for index in order[offset:]:
            yield data[held_out + index]
        position = (epoch + 1) * count


def rank_batches(
    examples: Iterator[dict[str, list[int]]], rank: int, world: int, batch_size: int, collate: PadCollator
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's micro-batches: the groups of ``batch_size`` whose group index ``% world == rank``."""
    group: list = []
    for position, example in enumerate(examples):
        if (position // batch_size) % world == rank:
            group.append(example)
            if len(group) == batch_size:
                yield collate(group)
                group = []


def held_out_batches(
    examples: list[dict[str, list[int]]], rank: int, world: int, batch_size: int, collate: PadCollator
) -> list[dict[str, torch.Tensor]]:
    """This process's share of the evaluation examples, padded so that every process runs the same
    number of batches (sharded models need every process in every forward); padding counts nothing."""
    mine = examples[rank::world]
    per_process = -(-len(examples) // world)
    blank = {**examples[0], "labels": [IGNORE_INDEX] * len(examples[0]["labels"])}
    mine = mine + [blank] * (per_process - len(mine))
    return [collate(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]

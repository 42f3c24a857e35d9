"""The GPU side of a compute node: how long GPU work takes, and the engines' MoE AllToAlls.

GPU compute is a cost model (:mod:`daemons.costmodel`), not a GPU: an engine sleeps for the model's time x
the time scale, the one wait in the serving plane that stands for work instead of doing it. Collectives are
real bytes between the engines' CNICs (:mod:`traffic.collectives`), moved by a process of the node's own.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import itertools
import time
from dataclasses import dataclass
from typing import Protocol

from daemons import costmodel, costprofile
from daemons.lockstep import LockstepMember
from traffic.collectives import ROW_COLUMNS, CollectiveAgent, Completion, ReceiverStats, csv_row, layer_bytes

COLLECTIVE_COLUMNS = ["engine", "phase", *ROW_COLUMNS]  # a node's collectives.csv


class Compute(Protocol):
    """How long GPU work takes, in wall seconds (already multiplied by the time scale)."""

    def prefill_layers_s(self, batch: list[tuple[int, int]]) -> tuple[float, ...]: ...

    def prefill_attention_s(self, batch: list[tuple[int, int]]) -> float:
        """Predicted attention time of the batch's busiest layer (the PE quota's measure)."""

    def decode_step_s(self, contexts: list[int]) -> float: ...

    def prefill_hbm_tokens(self) -> int:
        """Context tokens whose KV fits a PE GPU's HBM beside its weights (Basic's batch limit)."""

    def h2d_s(self, tokens: int) -> float:
        """Copying `tokens` tokens of KV from host DRAM into HBM (Basic's copy before its prefill)."""

    def prefill_parts(self, batch: list[tuple[int, int]]) -> costprofile.LayerParts | None:
        """This engine's own share of each layer kind, for its EP group's lockstep (None: not split)."""

    def group_chunk_s(self, parts: list[costprofile.LayerParts], group_size: int, layer_first: int,
                      layers: int) -> float:
        """Layers of an EP group's forward in lockstep, from its engines' own parts."""


# Where GPU time comes from (`cluster.gpu_model`): the layer profile measured on a real H200 converted to the
# paper's Hopper (daemons.costprofile), or the analytic roofline with constant efficiencies (daemons.costmodel).
GPU_MODELS = ("profile", "roofline")


@dataclass(frozen=True)
class CostModelCompute:
    model: costmodel.ModelSpec
    time_scale: float
    gpu_model: str = "roofline"

    def __post_init__(self) -> None:
        if self.gpu_model not in GPU_MODELS:
            raise ValueError(f"gpu model {self.gpu_model!r} is not one of {', '.join(GPU_MODELS)}")

    def prefill_layers_s(self, batch: list[tuple[int, int]]) -> tuple[float, ...]:
        """Per-layer seconds of prefilling a batch of (cached, new) token counts on one engine."""
        return tuple(t * self.time_scale for t in _prefill_layers(self.model, self.gpu_model, tuple(batch)))

    def prefill_attention_s(self, batch: list[tuple[int, int]]) -> float:
        if self.gpu_model == "profile":
            s = _profiled(self.model).op_s("attention", "prefill", list(batch))
        else:
            m = self.model
            s = max(costmodel.prefill_layer_cost(m, list(batch), layer).attention_s
                    for layer in {0, m.dense_layers % m.layers, m.layers - 1})
        return s * self.time_scale

    def prefill_hbm_tokens(self) -> int:
        return _prefill_hbm_tokens(self.model)

    def prefill_parts(self, batch: list[tuple[int, int]]) -> costprofile.LayerParts | None:
        """This engine's own share of each layer kind (GPU seconds, as `group_chunk_s` takes them), for its EP
        group's lockstep; None where the GPU model cannot split a layer (the roofline: the group then takes its
        slowest engine's whole cost)."""
        if self.gpu_model != "profile" or not self.model.experts:
            return None
        return _prefill_parts(self.model, tuple(batch))

    def group_chunk_s(self, parts: list[costprofile.LayerParts], group_size: int, layer_first: int,
                      layers: int) -> float:
        """Layers [layer_first, +layers) of an EP group's forward in lockstep (wall seconds), from its engines'
        own parts (``prefill_parts``, GPU seconds): every layer waits for its slowest engine, and the routed
        experts compute the group's tokens (``costprofile.ProfiledModel.group_layer_s``)."""
        m = self.model
        dense, moe, head = _profiled(m).group_layer_s(list(parts), group_size)
        n_dense = max(0, min(layer_first + layers, m.dense_layers) - layer_first)
        last = head if layer_first + layers == m.layers else 0.0
        return (n_dense * dense + (layers - n_dense) * moe + last) * self.time_scale

    def h2d_s(self, tokens: int) -> float:
        nbytes = tokens * costmodel.kv_bytes_per_token(self.model)
        return nbytes / costmodel.HOPPER.h2d_bytes_per_s * self.time_scale

    def decode_step_s(self, contexts: list[int]) -> float:
        if self.gpu_model == "profile":
            return _profiled(self.model).decode_step_time_s(contexts) * self.time_scale
        return costmodel.decode_step_time_s(self.model, contexts) * self.time_scale

    def describe(self) -> str:
        """Where this engine's GPU time comes from, in one line."""
        if self.gpu_model == "profile":
            return _profiled(self.model).describe()
        return f"{self.model.name}: analytic roofline on {costmodel.HOPPER.name} (constant efficiencies)"

    def outside_grid(self) -> dict[str, int]:
        """Predictions so far whose batch lay outside the profile's grid, by op and phase."""
        if self.gpu_model != "profile":
            return {}
        return {f"{op}/{phase}": n for (op, phase), n in sorted(_profiled(self.model).outside.items())}


@functools.lru_cache(maxsize=8)
def _prefill_hbm_tokens(model: costmodel.ModelSpec) -> int:  # asked at every batch: sums every layer's weights
    return costmodel.kv_capacity_tokens(model, ep_gpus=model.prefill_ep_gpus)


@functools.lru_cache(maxsize=8)
def _profiled(model: costmodel.ModelSpec) -> costprofile.ProfiledModel:
    return costprofile.ProfiledModel(model)


@functools.lru_cache(maxsize=4096)
def _prefill_parts(model: costmodel.ModelSpec, batch: tuple[tuple[int, int], ...]) -> costprofile.LayerParts:
    return _profiled(model).layer_parts(list(batch), "prefill", model.prefill_ep_gpus)


@functools.lru_cache(maxsize=4096)
def _prefill_layers(model: costmodel.ModelSpec, gpu_model: str,
                    batch: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    if gpu_model == "profile":
        return _profiled(model).prefill_layer_times_s(list(batch))
    return costmodel.prefill_layer_times_s(model, list(batch))


def layer_chunks(layers: int, chunks: int) -> list[tuple[int, int]]:
    """Split `layers` into `chunks` contiguous groups: [(layer_first, layers), ...]."""
    chunks = max(1, min(chunks, layers))
    edges = [layers * i // chunks for i in range(chunks + 1)]
    return [(a, b - a) for a, b in itertools.pairwise(edges) if b > a]


class Collectives:
    """This node's engines' side of their group's MoE AllToAlls (``traffic.collectives``).

    The engine group is every engine of the same role (all PEs, or all DEs), each
    reachable on its CNIC address at the collective port. An engine cannot finish
    a prefill layer chunk or a decode step before its AllToAll for those layers
    completed (every peer acknowledged its share): a slow collective shows in
    TTFT and TPOT, as on GPUs. The bytes move in the node's collective agent, a
    process of its own (GPUs and NICs run collectives beside the host's work, not
    in its event loop). Completion times are kept for collectives.csv."""

    def __init__(self, model: costmodel.ModelSpec, byte_scale: float, group: list[str], own: list[str],
                 dscp: int | None, time_scale: float = 1.0):
        missing = [a for a in own if a not in group]
        if missing:
            raise ValueError(f"engine addresses {missing} are not in the collective group {group}")
        self.model, self.byte_scale, self.ranks = model, byte_scale, len(group)
        self.time_scale = time_scale
        self.agent = CollectiveAgent(group, own, dscp)
        self.records: list[tuple[int, str, Completion]] = []  # (engine, phase, completion)
        self.received: ReceiverStats | None = None  # what this node's receivers got, known at close
        self.t0 = time.monotonic()

    async def start(self) -> None:
        await self.agent.start()

    async def run(self, engine: int, layer_first: int, layers: int, tokens: int, phase: str) -> None:
        nbytes = layer_bytes(self.model, layer_first, layers, tokens, self.ranks, self.byte_scale)
        if nbytes <= 0 or self.ranks < 2:
            return
        self.records.append((engine, phase, await self.agent.run(engine, nbytes)))

    def write_csv(self, path: str, node: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLLECTIVE_COLUMNS)
            w.writerows([f"{node}/{engine}", phase, *csv_row(c, self.t0, self.time_scale)]
                        for engine, phase, c in self.records)

    async def close(self) -> None:
        self.received = await self.agent.close()


class Gpu:
    """One engine's GPU: compute for some layers of its batch, in lockstep with its EP group where it has one
    (the group's slowest engine sets the chunk's time), then (with collectives) their AllToAll."""

    def __init__(self, index: int, compute: Compute, collectives: Collectives | None,
                 lockstep: LockstepMember | None = None):
        self.index, self.compute, self.collectives, self.lockstep = index, compute, collectives, lockstep

    async def run(self, seconds: float, layer_first: int, layers: int, tokens: int, phase: str,
                  chunk: tuple[int, int] = (0, 1), attention_s: float = 0.0,
                  parts: costprofile.LayerParts | None = None, pre_s: float = 0.0) -> None:
        """`seconds` of this engine's own GPU time for layer chunk `chunk` = (index, chunks) of its forward; its
        EP group's lockstep combines `parts` (its own share of each layer) and `pre_s` (its time before them)."""
        if self.lockstep is not None:
            seconds = await self.lockstep.chunk(chunk[0], chunk[1], seconds, attention_s, parts, pre_s,
                                                (layer_first, layers))
        await asyncio.sleep(seconds)  # the cost model's GPU time: the one sleep that stands for work
        if self.collectives is not None:
            await self.collectives.run(self.index, layer_first, layers, tokens, phase)

    async def join(self) -> None:
        """Work after idling: wait for the EP group's next forward boundary before forming a batch."""
        if self.lockstep is not None:
            await self.lockstep.join()

    async def idle(self) -> None:
        """No forward to run: the EP group stops waiting for this engine."""
        if self.lockstep is not None:
            await self.lockstep.leave()

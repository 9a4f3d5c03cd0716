"""Placement: which replica of which model runs on which node and GPU.

Pure and synchronous, no I/O: the scheduler hands :func:`plan` the desired models,
the live nodes and the current placements, and writes back only what changed.

Rules, in order of precedence:

- What runs stays where it is: placements on live nodes are never reshuffled.
- A GPU has capacity 1.0; a model with ``gpu_memory > 0`` needs one GPU with that
  much free, and several models may share a GPU (vLLM's ``--gpu-memory-utilization``).
  ``gpu_memory == 0`` is a CPU engine: it fits any node and is spread by count.
- ``ModelSpec.labels`` is a selector: every pair must equal the node's label.
- ``binpack`` picks the fullest GPU that still fits; ``spread`` the emptiest GPU on
  the least busy node, with replicas of one model on distinct nodes when possible.
- Unwanted replicas (scaled down, model unloaded) become Unloading; the node agent
  drains them and deletes the key. One on a dead node, or never placed, is deleted.
- A replica that fits nowhere is Pending with a reason a person can act on.

Fractions are integers in :data:`UNITS` per GPU so sums are exact. Free capacity
lives in sorted lists per label selector, so a plan costs O(replicas x log GPUs)
rather than O(replicas x nodes).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

import msgspec

from nebula.errors import InvalidRequest
from nebula.protocol import ModelSpec, NodeInfo, Placement, PlacementState

PlacementKey = tuple[str, int]
Selector = frozenset[tuple[str, str]]

_K = TypeVar("_K", bound=tuple[int, ...])

_NOTHING: Mapping[PlacementKey, Placement] = MappingProxyType({})

STRATEGIES = ("binpack", "spread")
UNITS = 10_000  # one GPU

_KEEP = (PlacementState.STARTING, PlacementState.READY, PlacementState.FAILED)


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise InvalidRequest(
            f"unknown placement strategy {strategy!r}; use one of {', '.join(STRATEGIES)}",
            param="strategy",
        )
    return strategy


def to_units(fraction: float) -> int:
    return round(fraction * UNITS)


def format_fraction(units: int) -> str:
    """0.5, 0.25, 1.0: short but never ambiguous."""
    text = f"{max(units, 0) / UNITS:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def format_labels(selector: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector))


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The outcome of one pass: the whole table, and the difference to write."""

    placements: dict[PlacementKey, Placement]
    changed: dict[PlacementKey, Placement]
    deleted: list[PlacementKey]

    @property
    def pending(self) -> int:
        return sum(p.state is PlacementState.PENDING for p in self.placements.values())


class _Group:
    """Nodes matching one label selector, with free capacity kept sorted."""

    __slots__ = ("cpus", "gpus", "size")

    def __init__(self) -> None:
        self.size = 0
        # binpack: (free, rank, gpu); spread: (free, -count, -rank, -gpu). Ascending.
        self.gpus: list[tuple[int, ...]] = []
        self.cpus: list[tuple[int, int]] = []  # (count, rank): least busy first


def _remove(items: list[_K], key: _K) -> None:
    del items[bisect_left(items, key)]


class _Cluster:
    """Capacity of the schedulable nodes. Nodes are ranks (sorted ids), GPUs are handles."""

    def __init__(self, nodes: Mapping[str, NodeInfo], spread: bool) -> None:
        self.spread = spread
        self.names = sorted(nodes)
        self.infos = [nodes[n] for n in self.names]
        self.rank = {n: r for r, n in enumerate(self.names)}
        self.count = [0] * len(self.names)
        self.node_gpus: list[list[int]] = []
        self.by_index: list[dict[int, int]] = []
        self.gpu_rank: list[int] = []
        self.gpu_index: list[int] = []
        self.free: list[int] = []
        for r, info in enumerate(self.infos):
            handles: list[int] = []
            index: dict[int, int] = {}
            for idx in sorted({g.index for g in info.gpus}):
                g = len(self.free)
                handles.append(g)
                index[idx] = g
                self.gpu_rank.append(r)
                self.gpu_index.append(idx)
                self.free.append(UNITS)
            self.node_gpus.append(handles)
            self.by_index.append(index)
        self.groups: dict[Selector, _Group] = {}
        self.node_groups: list[list[_Group]] = [[] for _ in self.names]

    # --- keys ------------------------------------------------------------------

    def gpu_key(self, g: int) -> tuple[int, ...]:
        r = self.gpu_rank[g]
        if self.spread:
            return (self.free[g], -self.count[r], -r, -g)
        return (self.free[g], r, g)

    def gpu_of(self, key: tuple[int, ...]) -> int:
        return -key[3] if self.spread else key[2]

    def cpu_key(self, r: int) -> tuple[int, int]:
        return (self.count[r], r)

    # --- building ----------------------------------------------------------------

    def consume(self, node_id: str, gpu_ids: list[int], units: int) -> int | None:
        """Account for a placement that stays (before groups exist)."""
        r = self.rank.get(node_id)
        if r is None:
            return None
        self.count[r] += 1
        for idx in gpu_ids:
            g = self.by_index[r].get(idx)
            if g is not None:
                self.free[g] -= units
        return r

    def group(self, selector: Selector) -> _Group:
        grp = self.groups.get(selector)
        if grp is not None:
            return grp
        grp = self.groups[selector] = _Group()
        for r, info in enumerate(self.infos):
            if all(info.labels.get(k) == v for k, v in selector):
                grp.size += 1
                self.node_groups[r].append(grp)
                grp.cpus.append(self.cpu_key(r))
                grp.gpus.extend(self.gpu_key(g) for g in self.node_gpus[r])
        grp.gpus.sort()
        grp.cpus.sort()
        return grp

    # --- choosing ----------------------------------------------------------------

    def pick_gpu(self, grp: _Group, need: int, used: set[int]) -> int | None:
        gpus = grp.gpus
        if not self.spread:
            i = bisect_left(gpus, (need,))
            return self.gpu_of(gpus[i]) if i < len(gpus) else None
        if not gpus or gpus[-1][0] < need:
            return None
        if used and len(used) < grp.size:
            # Emptiest first; skip nodes that already run this model while others fit.
            for i in range(len(gpus) - 1, -1, -1):
                key = gpus[i]
                if key[0] < need:
                    break
                if -key[2] not in used:
                    return self.gpu_of(key)
        return self.gpu_of(gpus[-1])

    def pick_cpu(self, grp: _Group, used: set[int]) -> int | None:
        if not grp.cpus:
            return None
        if used and len(used) < grp.size:
            for _, r in grp.cpus:
                if r not in used:
                    return r
        return grp.cpus[0][1]

    def take(self, r: int, g: int | None, units: int) -> None:
        """Place one replica on node ``r`` (GPU ``g``) and keep every sorted list true."""
        groups = self.node_groups[r]
        # Spread keys carry the node's count, so all its GPUs move; binpack keys only ``g``.
        moved = self.node_gpus[r] if self.spread else ([g] if g is not None else [])
        old = [self.gpu_key(x) for x in moved]
        old_cpu = self.cpu_key(r)
        self.count[r] += 1
        if g is not None:
            self.free[g] -= units
        for grp in groups:
            for x, key in zip(moved, old, strict=True):
                _remove(grp.gpus, key)
                insort(grp.gpus, self.gpu_key(x))
            _remove(grp.cpus, old_cpu)
            insort(grp.cpus, self.cpu_key(r))

    def why_pending(self, selector: Selector, need: int) -> str:
        if not self.names:
            return "no live nodes"
        grp = self.groups[selector]
        where = f" among nodes with labels {format_labels(selector)}" if selector else ""
        if grp.size == 0:
            return f"no node matches labels {format_labels(selector)}"
        if not grp.gpus:
            return f"needs {format_fraction(need)} of a GPU, no live node has a GPU{where}"
        best = grp.gpus[-1]  # both key orders sort by free capacity first
        node = self.names[self.gpu_rank[self.gpu_of(best)]]
        return (
            f"needs {format_fraction(need)} of a GPU, largest free is "
            f"{format_fraction(best[0])} on {node}{where}"
        )


def plan(
    models: Mapping[str, ModelSpec],
    nodes: Mapping[str, NodeInfo],
    placements: Mapping[PlacementKey, Placement] = _NOTHING,
    *,
    strategy: str = "binpack",
    grace_nodes: Collection[str] = (),
    now: float = 0.0,
) -> Plan:
    """Place every wanted replica; leave what runs where it is.

    ``nodes`` are the live nodes. ``grace_nodes`` lost their heartbeat recently: what
    runs there is kept, nothing new goes there. A placement on any other node is on a
    dead node and is moved (or deleted if unwanted). ``now`` stamps changed placements.
    """
    check_strategy(strategy)
    grace = set(grace_nodes)
    cluster = _Cluster({n: i for n, i in nodes.items() if n not in grace}, strategy == "spread")
    held = grace | cluster.rank.keys()

    result: dict[PlacementKey, Placement] = {}
    changed: dict[PlacementKey, Placement] = {}
    deleted: list[PlacementKey] = []
    used: dict[str, set[int]] = {}  # model -> ranks of nodes running a replica
    todo: list[tuple[int, str, int]] = []  # (-need, model, replica)

    def keep(key: PlacementKey, p: Placement) -> None:
        result[key] = p
        if p.node_id is not None:
            r = cluster.consume(p.node_id, p.gpu_ids, to_units(p.memory_fraction))
            if r is not None:
                used.setdefault(key[0], set()).add(r)

    for key, p in placements.items():
        name, replica = key
        spec = models.get(name)
        wanted = spec is not None and 0 <= replica < spec.replicas
        alive = p.node_id is not None and p.node_id in held
        if p.state is PlacementState.UNLOADING:
            # Still draining: it holds its GPU until the node agent deletes the key,
            # and blocks its replica index (wanted or not) until then.
            if alive:
                keep(key, p)
            else:
                deleted.append(key)
        elif not wanted:
            if alive:
                reason = "model unloaded" if spec is None else f"scaled down to {spec.replicas}"
                q = msgspec.structs.replace(
                    p, state=PlacementState.UNLOADING, reason=reason, updated_at=now
                )
                keep(key, q)
                changed[key] = q
            else:
                deleted.append(key)
        elif alive and p.state in _KEEP:
            keep(key, p)
        else:  # Pending, or its node died
            assert spec is not None
            todo.append((-to_units(spec.gpu_memory), name, replica))

    for name, spec in models.items():
        for replica in range(spec.replicas):
            if (name, replica) not in placements:
                todo.append((-to_units(spec.gpu_memory), name, replica))

    # Largest first: first-fit decreasing packs tighter and leaves small gaps for small models.
    todo.sort()
    selectors = {name: frozenset(models[name].labels.items()) for _, name, _ in todo}
    for selector in set(selectors.values()):
        cluster.group(selector)

    pending: list[tuple[PlacementKey, Selector, int]] = []
    for neg_need, name, replica in todo:
        spec = models[name]
        need = -neg_need
        grp = cluster.groups[selectors[name]]
        ranks = used.setdefault(name, set())
        gpu: int | None = None
        if need > 0:
            gpu = cluster.pick_gpu(grp, need, ranks)
            r = None if gpu is None else cluster.gpu_rank[gpu]
        else:
            r = cluster.pick_cpu(grp, ranks)
        if r is None:
            pending.append(((name, replica), selectors[name], need))
            continue
        cluster.take(r, gpu, need)
        ranks.add(r)
        q = Placement(
            model=name,
            replica=replica,
            node_id=cluster.names[r],
            gpu_ids=[] if gpu is None else [cluster.gpu_index[gpu]],
            memory_fraction=spec.gpu_memory if gpu is not None else 0.0,
            state=PlacementState.STARTING,
            updated_at=now,
        )
        result[(name, replica)] = changed[(name, replica)] = q

    # Reasons come from the final capacities so the next pass, which starts from
    # exactly those, finds the same words and writes nothing.
    for key, selector, need in pending:
        reason = cluster.why_pending(selector, need)
        old = placements.get(key)
        if (
            old is not None
            and old.state is PlacementState.PENDING
            and old.node_id is None
            and old.reason == reason
        ):
            result[key] = old
            continue
        q = Placement(
            model=key[0],
            replica=key[1],
            state=PlacementState.PENDING,
            reason=reason,
            updated_at=now,
        )
        result[key] = changed[key] = q

    return Plan(placements=result, changed=changed, deleted=deleted)

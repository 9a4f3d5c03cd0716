"""The pure placement algorithm: no NATS, no clock."""

from __future__ import annotations

import random
import time

import pytest
from msgspec.structs import replace

from nebula.errors import InvalidRequest
from nebula.placement import Plan, format_fraction, plan
from nebula.protocol import GpuInfo, ModelSpec, NodeInfo, Placement, PlacementState

S = PlacementState


def node(node_id: str, gpus: int = 1, **labels: str) -> NodeInfo:
    return NodeInfo(node_id=node_id, gpus=[GpuInfo(index=i) for i in range(gpus)], labels=labels)


def nodes(*infos: NodeInfo) -> dict[str, NodeInfo]:
    return {n.node_id: n for n in infos}


def model(name: str, replicas: int = 1, gpu: float = 0.0, /, **labels: str) -> ModelSpec:
    return ModelSpec(name=name, engine="sim", replicas=replicas, gpu_memory=gpu, labels=labels)


def models(*specs: ModelSpec) -> dict[str, ModelSpec]:
    return {m.name: m for m in specs}


def where(p: Plan, name: str) -> list[tuple[str | None, list[int]]]:
    found = sorted((k, v) for k, v in p.placements.items() if k[0] == name)
    return [(v.node_id, v.gpu_ids) for _, v in found]


def test_binpack_fills_one_gpu_before_the_next() -> None:
    p = plan(models(model("m", 3, 0.5)), nodes(node("a", 2), node("b", 2)))
    assert where(p, "m") == [("a", [0]), ("a", [0]), ("a", [1])]
    assert all(v.state is S.STARTING and v.memory_fraction == 0.5 for v in p.placements.values())
    assert set(p.changed) == set(p.placements) and not p.deleted


def test_binpack_picks_the_fullest_gpu_that_fits() -> None:
    cluster = nodes(node("a", 2), node("b", 1))
    first = plan(models(model("big", 1, 0.7), model("mid", 1, 0.5)), cluster)
    # FFD: big (0.7) on a/0, mid (0.5) does not fit beside it: a/1.
    assert where(first, "big") == [("a", [0])] and where(first, "mid") == [("a", [1])]
    second = plan(
        models(model("big", 1, 0.7), model("mid", 1, 0.5), model("small", 1, 0.3)),
        cluster,
        first.placements,
    )
    # 0.3 fits on a/0 (0.3 free), a/1 (0.5 free) and b/0 (1.0 free): the fullest is a/0.
    assert where(second, "small") == [("a", [0])]
    assert set(second.changed) == {("small", 0)}


def test_spread_puts_replicas_on_distinct_nodes_and_emptiest_gpus() -> None:
    p = plan(
        models(model("m", 3, 0.5)),
        nodes(node("a", 2), node("b", 2), node("c", 1)),
        strategy="spread",
    )
    assert sorted(n for n, _ in where(p, "m")) == ["a", "b", "c"]
    # A second model lands on empty GPUs, not beside the first.
    q = plan(
        models(model("m", 3, 0.5), model("n", 2, 0.5)),
        nodes(node("a", 2), node("b", 2), node("c", 1)),
        p.placements,
        strategy="spread",
    )
    assert sorted(where(q, "n")) == [("a", [1]), ("b", [1])]


def test_spread_reuses_a_node_only_when_it_must() -> None:
    p = plan(models(model("m", 3, 0.5)), nodes(node("a", 2), node("b", 1)), strategy="spread")
    placed = sorted(where(p, "m"))
    assert placed == [("a", [0]), ("a", [1]), ("b", [0])]


def test_models_share_a_gpu_by_fraction() -> None:
    p = plan(
        models(model("x", 1, 0.6), model("y", 1, 0.4), model("z", 1, 0.1)), nodes(node("a", 1))
    )
    assert where(p, "x") == [("a", [0])] and where(p, "y") == [("a", [0])]
    (z,) = [v for k, v in p.placements.items() if k[0] == "z"]
    assert z.state is S.PENDING and z.node_id is None
    assert z.reason == "needs 0.1 of a GPU, largest free is 0.0 on a"


def test_fractions_are_exact() -> None:
    # 0.1 * 10 in floats is 0.9999999999999999; ten of them must still fit one GPU.
    p = plan(models(model("tenth", 10, 0.1)), nodes(node("a", 1)))
    assert p.pending == 0 and {n for n, _ in where(p, "tenth")} == {"a"}


def test_pending_reason_names_the_largest_free_gpu() -> None:
    cluster = nodes(node("node-a", 1), node("node-b", 1))
    busy = plan(models(model("x", 1, 0.7), model("y", 1, 0.9)), cluster)
    p = plan(
        models(model("x", 1, 0.7), model("y", 1, 0.9), model("big", 1, 0.5)),
        cluster,
        busy.placements,
    )
    big = p.placements[("big", 0)]
    assert big.state is S.PENDING
    # FFD put y (0.9) on node-a first, then x (0.7) on node-b.
    assert big.reason == "needs 0.5 of a GPU, largest free is 0.3 on node-b"
    # Written once; the next pass finds the same words and writes nothing.
    again = plan(
        models(model("x", 1, 0.7), model("y", 1, 0.9), model("big", 1, 0.5)), cluster, p.placements
    )
    assert not again.changed and not again.deleted


def test_pending_reasons_for_labels_no_gpu_and_no_nodes() -> None:
    cluster = nodes(node("a", 1, gpu="t4"), node("cpu-only", 0))
    p = plan(models(model("want-a100", 1, 0.5, gpu="a100")), cluster)
    assert p.placements[("want-a100", 0)].reason == "no node matches labels gpu=a100"
    p = plan(models(model("gpu", 1, 0.5, zone="x")), nodes(node("c", 0, zone="x")))
    assert p.placements[("gpu", 0)].reason == (
        "needs 0.5 of a GPU, no live node has a GPU among nodes with labels zone=x"
    )
    p = plan(models(model("m", 2, 0.5)), {})
    assert [v.reason for v in p.placements.values()] == ["no live nodes"] * 2
    assert p.pending == 2


def test_labels_select_nodes() -> None:
    cluster = nodes(node("a", 1, gpu="t4"), node("b", 1, gpu="a100", zone="eu"), node("c", 1))
    p = plan(
        models(model("m", 1, 0.5, gpu="a100"), model("n", 1, 0.5, gpu="a100", zone="eu")), cluster
    )
    assert {n for n, _ in where(p, "m")} == {"b"} and where(p, "n") == [("b", [0])]
    p = plan(models(model("m", 3, 0.5, gpu="a100")), cluster)
    assert p.placements[("m", 2)].reason == (
        "needs 0.5 of a GPU, largest free is 0.0 on b among nodes with labels gpu=a100"
    )


def test_cpu_engines_fit_any_node_spread_by_count() -> None:
    cluster = nodes(node("gpu", 2), node("cpu1", 0), node("cpu2", 0))
    p = plan(models(model("emb", 3), model("chat", 1, 0.5)), cluster)
    assert sorted(n for n, _ in where(p, "emb")) == ["cpu1", "cpu2", "gpu"]
    assert all(
        v.gpu_ids == [] and v.memory_fraction == 0.0
        for k, v in p.placements.items()
        if k[0] == "emb"
    )
    # A fourth goes to a node with the fewest placements (the GPU node has two).
    q = plan(models(model("emb", 4), model("chat", 1, 0.5)), cluster, p.placements)
    assert q.placements[("emb", 3)].node_id in {"cpu1", "cpu2"}


def test_running_placements_stay_put_and_keep_their_state() -> None:
    cluster = nodes(node("a", 1), node("b", 1))
    ready = Placement(
        model="m", replica=0, node_id="b", gpu_ids=[0], memory_fraction=0.5, state=S.READY
    )
    failed = Placement(
        model="m", replica=1, node_id="b", gpu_ids=[0], memory_fraction=0.5, state=S.FAILED
    )
    p = plan(models(model("m", 3, 0.5)), cluster, {("m", 0): ready, ("m", 1): failed})
    # Binpack would have started on a; what runs on b is not moved.
    assert p.placements[("m", 0)] is ready and p.placements[("m", 1)] is failed
    assert set(p.changed) == {("m", 2)} and p.placements[("m", 2)].node_id == "a"
    assert not plan(models(model("m", 3, 0.5)), cluster, p.placements).changed


def test_dead_node_replicas_are_replaced() -> None:
    before = plan(models(model("m", 2, 0.5)), nodes(node("a", 1), node("b", 1)))
    assert {n for n, _ in where(before, "m")} == {"a"}
    running = {k: replace(v, state=S.READY) for k, v in before.placements.items()}
    after = plan(models(model("m", 2, 0.5)), nodes(node("b", 1)), running, now=123.0)
    assert where(after, "m") == [("b", [0]), ("b", [0])]
    assert all(v.state is S.STARTING and v.updated_at == 123.0 for v in after.changed.values())
    assert set(after.changed) == {("m", 0), ("m", 1)} and not after.deleted


def test_nodes_in_grace_keep_replicas_but_get_nothing_new() -> None:
    cluster = nodes(node("a", 1), node("b", 1))
    before = plan(models(model("m", 1, 0.5)), cluster)
    assert where(before, "m") == [("a", [0])]
    p = plan(models(model("m", 2, 0.5)), cluster, before.placements, grace_nodes={"a"})
    assert p.placements[("m", 0)] is before.placements[("m", 0)]
    assert p.placements[("m", 1)].node_id == "b"
    # A grace node needs no heartbeat of its own to hold what runs there.
    q = plan(models(model("m", 1, 0.5)), {}, before.placements, grace_nodes={"a"})
    assert not q.changed and not q.deleted


def test_scale_down_and_unload() -> None:
    cluster = nodes(node("a", 4))
    full = plan(models(model("m", 3, 0.5), model("gone", 1, 0.5)), cluster).placements
    # Replica 2 on a dead node and a pending one are simply deleted.
    full[("m", 2)] = replace(full[("m", 2)], node_id="dead")
    full[("m", 3)] = Placement(model="m", replica=3, reason="x")
    p = plan(models(model("m", 1, 0.5)), cluster, full)
    assert p.placements[("m", 0)] is full[("m", 0)]
    assert p.placements[("m", 1)].state is S.UNLOADING
    assert p.placements[("m", 1)].reason == "scaled down to 1"
    assert p.placements[("gone", 0)].state is S.UNLOADING
    assert p.placements[("gone", 0)].reason == "model unloaded"
    assert p.placements[("gone", 0)].node_id == "a"  # the agent must know where to drain
    assert sorted(p.deleted) == [("m", 2), ("m", 3)]
    assert set(p.changed) == {("m", 1), ("gone", 0)}
    # Unloading is stable, and an Unloading placement on a dead node is deleted.
    assert not plan(models(model("m", 1, 0.5)), cluster, p.placements).changed
    q = plan(models(model("m", 1, 0.5)), {}, p.placements)
    assert ("gone", 0) in q.deleted and ("m", 1) in q.deleted


def test_unloading_holds_capacity_and_its_index() -> None:
    cluster = nodes(node("a", 1))
    p = plan(models(model("m", 2, 0.5)), cluster)
    down = plan(models(model("m", 1, 0.5)), cluster, p.placements)
    assert down.placements[("m", 1)].state is S.UNLOADING
    # Scaled back up while replica 1 drains: it is neither placed twice nor revived.
    up = plan(models(model("m", 2, 0.5), model("other", 1, 0.5)), cluster, down.placements)
    assert up.placements[("m", 1)].state is S.UNLOADING
    assert up.placements[("other", 0)].state is S.PENDING  # the draining replica holds 0.5
    # Once the node agent deleted the key, the replica is placed anew.
    drained = dict(up.placements)
    del drained[("m", 1)]
    again = plan(models(model("m", 2, 0.5), model("other", 1, 0.5)), cluster, drained)
    assert again.placements[("m", 1)].state is S.STARTING
    assert again.placements[("other", 0)].state is S.PENDING


def test_overcommitted_gpu_takes_nothing_more() -> None:
    odd = Placement(
        model="x", replica=0, node_id="a", gpu_ids=[0], memory_fraction=1.2, state=S.READY
    )
    p = plan(models(model("x", 1, 1.2), model("y", 1, 0.1)), nodes(node("a", 1)), {("x", 0): odd})
    assert p.placements[("x", 0)] is odd
    assert p.placements[("y", 0)].reason == "needs 0.1 of a GPU, largest free is 0.0 on a"


def test_unknown_strategy_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="strategy"):
        plan({}, {}, {}, strategy="random")


def test_format_fraction() -> None:
    assert [format_fraction(u) for u in (5000, 2500, 10000, 3, -5)] == [
        "0.5",
        "0.25",
        "1.0",
        "0.0003",
        "0.0",
    ]


@pytest.mark.parametrize("strategy", ["binpack", "spread"])
def test_scale_1000_nodes_5000_replicas(strategy: str) -> None:
    rng = random.Random(7)
    cluster = {
        f"node-{i:04d}": node(f"node-{i:04d}", rng.randint(4, 8), zone=f"z{i % 3}")
        for i in range(1000)
    }
    specs: dict[str, ModelSpec] = {}
    total = 0
    while total < 5000:
        n = min(rng.randint(1, 40), 5000 - total)
        name = f"m{len(specs)}"
        labels = {"zone": "z1"} if len(specs) % 10 == 0 else {}
        specs[name] = model(name, n, rng.choice([0.0, 0.1, 0.25, 0.3, 0.5, 1.0]), **labels)
        total += n
    t0 = time.perf_counter()
    p = plan(specs, cluster, {}, strategy=strategy)
    scratch = time.perf_counter() - t0
    assert len(p.changed) == 5000 and p.pending == 0
    t0 = time.perf_counter()
    steady = plan(specs, cluster, p.placements, strategy=strategy)
    replan = time.perf_counter() - t0
    assert not steady.changed and not steady.deleted
    lost = set(list(cluster)[:100])
    t0 = time.perf_counter()
    moved = plan(
        specs, {k: v for k, v in cluster.items() if k not in lost}, p.placements, strategy=strategy
    )
    recover = time.perf_counter() - t0
    assert moved.pending == 0 and all(v.node_id not in lost for v in moved.placements.values())
    took = f"from scratch {scratch:.3f}s, steady {replan:.3f}s, -10% nodes {recover:.3f}s"
    print(f"\n{strategy}: {took}")
    assert scratch < 1.0 and recover < 1.0


def test_capacity_is_never_exceeded() -> None:
    rng = random.Random(3)
    cluster = {f"n{i}": node(f"n{i}", rng.randint(0, 3)) for i in range(20)}
    specs = {
        f"m{i}": model(f"m{i}", rng.randint(1, 6), rng.choice([0.0, 0.2, 0.35, 0.5, 0.9]))
        for i in range(15)
    }
    for strategy in ("binpack", "spread"):
        p = plan(specs, cluster, {}, strategy=strategy)
        used: dict[tuple[str | None, int], float] = {}
        for v in p.placements.values():
            for g in v.gpu_ids:
                used[(v.node_id, g)] = used.get((v.node_id, g), 0.0) + v.memory_fraction
        assert all(u <= 1.0 + 1e-9 for u in used.values())
        assert not plan(specs, cluster, p.placements, strategy=strategy).changed

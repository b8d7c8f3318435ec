#!/usr/bin/env python
"""Loss curves of ``bench_train.py``'s 300-step rows (``curve ...``), one line each, and how far they stay apart.

Every curve row trains the same fresh connector on the same 8 fixed batches with the same noise and timesteps, so
a gap between two curves is what the setting changed (fp8 matmuls, another compile scope), nothing else.

    python benchmarks/plot_train_curves.py benchmarks/train/bench_train-levers-gpu1-h200-2026-11-30.json OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def smoothed(values: list[float], window: int = 20) -> list[float]:
    """Means over consecutive ``window``-step blocks: single steps differ by their random timesteps' difficulty."""
    return [sum(values[i : i + window]) / len(values[i : i + window]) for i in range(0, len(values), window)]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.loads(Path(argv[0]).read_text())["rows"] if "losses" in r]
    if not rows:
        print(f"{argv[0]}: no loss-curve rows", file=sys.stderr)
        return 1
    reference = smoothed(rows[0]["losses"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        curve = smoothed(row["losses"])
        gap = max(abs(a - b) / a for a, b in zip(reference, curve))
        print(
            f"{row['config']}: last-100-step mean {sum(row['losses'][-100:]) / 100:.4f}, "
            f"largest gap to {rows[0]['config']} (20-step means) {100 * gap:.2f}%"
        )
        ax.plot(
            [20 * i + 10 for i in range(len(curve))], curve, label=f"{row['config']} ({row['samples_per_s']} samples/s)"
        )
    ax.set(xlabel="step", ylabel="loss (20-step mean)", title="connector training, same data / noise / seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(argv[1], dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

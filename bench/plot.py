"""A PNG of the failover and recovery latency distributions written by bench.failover --json.

    python -m bench.plot bench/results/failover.json bench/results/latency.png

Needs matplotlib (benchmarks only; not a dependency of the agent or its tests). Two panels, one
per phase: the empirical CDF of each protector on a log time axis, with the agent's targets
drawn as vertical lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.failover import percentile

__all__ = ["main", "plot"]

COLORS = {"agent": "#1f77b4", "polling": "#d62728", "monit": "#2ca02c"}


def plot(data: dict[str, Any], out: Path) -> None:
    """Write the two-panel CDF plot of ``data`` (bench.failover's JSON) to ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"bench.plot: matplotlib is needed ({exc}); pip install matplotlib") from exc
    settings = data["settings"]
    results = data["results"]
    recovery_target = settings["rise"] * settings["rise_interval_ms"] + 20
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    panels = (("failover_ms", "Failover: core SIGKILL -> first refused connect",
               [(5, "target p50 5 ms"), (20, "target p99 20 ms")]),
              ("recovery_ms", "Recovery: service ready -> first accepted connect",
               [(recovery_target, f"target p50 {recovery_target} ms")]))
    for ax, (key, title, targets) in zip(axes, panels, strict=True):
        for name, res in results.items():
            v = sorted(x for x in res[key] if x > 0)
            if not v:
                continue
            y = [(i + 1) / len(v) for i in range(len(v))]
            med = percentile(v, 50)
            ax.step(v, y, where="post", color=COLORS.get(name), linewidth=2,
                    label=f"{name} (n={len(v)}, p50 {med:.1f} ms)")
        for x, label in targets:
            ax.axvline(x, color="grey", linestyle="--", linewidth=1)
            ax.text(x, 0.45, " " + label, rotation=90, va="bottom", ha="right", fontsize=8,
                    color="dimgrey")
        ax.set_xscale("log")
        ax.set_xlabel("milliseconds (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("fraction of rounds")
    fig.suptitle(f"sslvpn-heartbeat vs 1 s polling vs monit: {settings['rounds']} rounds each "
                 "(one 2-core VM, network namespaces)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: read the JSON, write the PNG."""
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n")[0])
    ap.add_argument("json", type=Path, nargs="?", default=Path("bench/results/failover.json"))
    ap.add_argument("png", type=Path, nargs="?", default=Path("bench/results/latency.png"))
    a = ap.parse_args(argv)
    plot(json.loads(a.json.read_text()), a.png)
    print(f"bench.plot: wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

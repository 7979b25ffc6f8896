"""Loss curves of the quality table's trained rows → PNG (matplotlib).

    python bench/quality_plot.py bench/results/quality.json bench/results/quality_curves.png

Two panels against training tokens: the KL to the teacher (what distillation minimises) and the
response-token cross-entropy, one line per trained row (partition:training:active), with the
phase-1 → phase-2 switch where the rows change routing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(quality_path: str, png_path: str) -> None:
    result = json.loads(Path(quality_path).read_text())
    rows = [row for row in result["rows"] if row.get("curve")]
    if not rows:
        raise SystemExit(f"{quality_path}: no row has a loss curve (train rows write one)")
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    styles = {"smk": "-", "samk": ":", "selective": "--", "full": "-."}
    for row in rows:
        curve = row["curve"]
        tokens = [t / 1e6 for t in curve["tokens_seen"]]
        label = f"{row['partition']}:{row['training']}:{row['active_frac']:g}"
        style = styles.get(row["training"], "-")
        axes[0].plot(tokens, curve["kd"], style, label=label, linewidth=1.2)
        axes[1].plot(tokens, curve["ce"], style, label=label, linewidth=1.2)
    axes[0].set(title="KL to the teacher (per token)", xlabel="training tokens (M)", ylabel="KL", yscale="log")
    axes[1].set(title="response-token cross-entropy", xlabel="training tokens (M)", ylabel="CE (nats)")
    axes[1].legend(fontsize=7, loc="upper right")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(f"{result['device']} · builtin teacher · {result['date'][:10]} · phase 1 (all experts) → "
                    "phase 2 (routed) for MoE rows", fontsize=10)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    print(f"{len(rows)} curves → {png_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    plot(sys.argv[1], sys.argv[2])

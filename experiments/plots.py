"""PNG plots of an experiment: each strategy's bound beside its claimed and measured figures."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: files only, and no backend chosen for others

PANELS = (("prefill", "tps", "prefill tokens/s (higher is better)"),
          ("decode", "tpot_ms", "decode ms per output token (lower is better)"))  # fmt: skip


def experiment_plot(doc: dict, path: Path) -> Path:
    """Two panels (prefill TPS, decode TPOT): per strategy, the overlapped and exposed-comm
    bounds as bars, the paper's claim as a red cross, the measured figure as a black dot."""
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, (phase, key, title) in zip(axes, PANELS, strict=True):
        rows = [r for r in doc["rows"] if r["phase"] == phase]
        names = [r["strategy"] for r in rows]
        xs = range(len(rows))
        best = [_get(r.get("bound"), key) for r in rows]
        serial = [_get(r.get("bound_serial"), key) for r in rows]
        ax.bar([x - 0.2 for x in xs], [v or 0 for v in best], 0.4, label="bound, overlapped")
        ax.bar([x + 0.2 for x in xs], [v or 0 for v in serial], 0.4, label="bound, comm exposed")
        shown = [v for v in (*best, *serial) if v]
        labelled: set[str] = set()
        for x, r in zip(xs, rows, strict=True):
            for source, style, label in (
                ("claimed", "rx", "claimed"),
                ("measured", "ko", "measured here"),
            ):
                value = _get(r.get(source), key)
                if value is not None:
                    ax.plot(x, value, style, markersize=9, mew=2,
                            label=None if label in labelled else label)  # fmt: skip
                    labelled.add(label)
                    shown.append(value)
        ax.set_xticks(list(xs), names, rotation=15)
        ax.set_title(title)
        ax.set_yscale("log")
        if shown:  # every bar top and marker in view (log bars have no natural bottom)
            ax.set_ylim(min(shown) / 2, max(shown) * 2)
        ax.legend(fontsize=8)
    fig.suptitle(f"{doc['experiment']} ({doc['scale']}) on {doc['hardware']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _get(figures: dict | None, key: str) -> float | None:
    return None if not figures else figures.get(key)

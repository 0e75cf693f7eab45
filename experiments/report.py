"""Tables and JSON for the command line."""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from jaxmoe.compare import LayoutReport
from jaxmoe.config import ModelConfig

SHORT = {
    "all-to-all": "a2a",
    "all-gather": "ag",
    "all-reduce": "ar",
    "reduce-scatter": "rs",
    "collective-permute": "cp",
}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), line, *(fmt.format(*r) for r in rows)])


def _collectives_cell(report: LayoutReport) -> str:
    parts = [f"{count:g} {SHORT[kind]}" for kind, (count, _) in report.per_layer.items() if count]
    return ", ".join(parts) or "none"


def compare_table(cfg: ModelConfig, reports: Sequence[LayoutReport]) -> str:
    headers = (
        "strategy",
        "mesh",
        "max|dlogits|",
        "collectives/layer",
        "sent/layer/device",
        "vs textbook",
        "bubble",
        "params/device",
    )
    rows = [
        (
            r.strategy,
            "x".join(f"{a}={n}" for a, n in r.mesh.items()),
            f"{r.max_abs_err:.1e} ({r.max_abs_err / r.logits_scale:.0e} rel)",
            _collectives_cell(r),
            human_bytes(r.bytes_per_layer),
            f"{r.bytes_vs_textbook:.3f}",
            f"{r.bubble_fraction:.0%}" if r.bubble_fraction else "-",
            f"{human_bytes(r.param_bytes_per_device)} of {human_bytes(r.param_bytes_total)}",
        )
        for r in reports
    ]
    title = (
        f"{cfg.name}: {cfg.n_layers} layers ({cfg.n_moe_layers} MoE, {cfg.n_experts} experts "
        f"top-{cfg.top_k}), D {cfg.d_model}, {cfg.n_heads}x{cfg.head_dim} heads, F {cfg.d_ff}, "
        f"B {cfg.batch} x S {cfg.seq_len}, {cfg.dtype}, {cfg.micro_batches} micro-batches "
        f"in pipelines; forward pass vs one device"
    )
    legend = (
        "a2a all-to-all, ag all-gather, ar all-reduce, rs reduce-scatter, cp collective-permute; "
        "bubble: share of a pipeline's M + P - 1 iterations a stage idles, (P - 1) / (M + P - 1)"
    )
    return f"{title}\n\n{table(headers, rows)}\n\n{legend}"


def write_compare_json(path: Path, cfg: ModelConfig, reports: Sequence[LayoutReport]) -> None:
    doc = {
        "config": dataclasses.asdict(cfg),
        "strategies": {r.strategy: r.to_json(cfg) for r in reports},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")

"""Results as text: the tables the command line prints and notebooks show (strings, never
printed here)."""

from collections.abc import Sequence

from jaxmoe.compare import LayoutReport
from jaxmoe.config import ModelConfig

SHORT = {
    "all-to-all": "a2a",
    "all-gather": "ag",
    "all-reduce": "ar",
    "reduce-scatter": "rs",
    "collective-permute": "cp",
    "transfer": "xfer",
    "fanout": "fan",
}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), line, *(fmt.format(*r) for r in rows)])


def _collectives_cell(report: LayoutReport) -> str:
    parts = [f"{count:g} {SHORT[kind]}" for kind, (count, _) in report.per_layer.items() if count]
    return ", ".join(parts) or "none"


def _mesh_cell(mesh: dict) -> str:
    """`pipe=2xtensor=8`; two sub-meshes: `replica=2xheads=6 + expert=4`."""
    if all(isinstance(v, dict) for v in mesh.values()):
        return " + ".join(_mesh_cell(sub) for sub in mesh.values())
    return "x".join(f"{a}={n}" for a, n in mesh.items())


def _error_cell(report: LayoutReport) -> str:
    """`7.7e-07 (6e-07 rel)`; `non-finite` when this layout's logits (or one device's) are not
    all finite numbers."""
    if report.nonfinite_logits:
        return f"non-finite ({report.nonfinite_logits:,} of {report.n_logits:,})"
    if report.max_abs_err is None:
        return "non-finite (one device's)"
    err, scale = report.max_abs_err, report.logits_scale
    return f"{err:.1e} ({err / scale:.0e} rel)" if scale else f"{err:.1e}"


MINIMUM = (
    "vs minimum: bytes sent against the least the layout needs (jaxmoe.layout.minimum_per_layer);"
    " a pipeline's idle iterations still send, x 1 / (1 - bubble)"
)
TRAIN_MEMORY = ("parameters", "gradients", "optimizer_state", "activations", "total")


def compare_table(cfg: ModelConfig, reports: Sequence[LayoutReport]) -> str:
    phase = reports[0].phase if reports else "forward"
    if phase != "forward":
        return _compiled_table(cfg, reports, phase)
    headers = (
        "strategy",
        "mesh",
        "max|dlogits|",
        "collectives/layer",
        "sent/layer/device",
        "vs minimum",
        "bubble",
        "params/device",
    )
    rows = [
        (
            r.strategy,
            _mesh_cell(r.mesh),
            _error_cell(r),
            _collectives_cell(r),
            human_bytes(r.bytes_per_layer),
            f"{r.bytes_vs_minimum:.3f}",
            f"{r.bubble_fraction:.0%}" if r.bubble_fraction else "-",
            f"{human_bytes(r.param_bytes_per_device)} of {human_bytes(r.param_bytes_total)}",
        )
        for r in reports
    ]
    title = (
        f"{cfg.name}: {cfg.n_layers} layers ({cfg.n_moe_layers} MoE, {cfg.n_experts} experts "
        f"top-{cfg.top_k}), D {cfg.d_model}, {cfg.n_heads}x{cfg.head_dim} heads, F {cfg.d_ff}, "
        f"B {cfg.batch} x S {cfg.seq_len}, {cfg.dtype}, {cfg.micro_batches} micro-batches "
        f"in pipelines and ma_separation; forward pass vs one device"
    )
    legend = (
        "a2a all-to-all, ag all-gather, ar all-reduce, rs reduce-scatter, cp collective-permute; "
        f"{MINIMUM}; "
        "bubble: share of a pipeline's M + P - 1 iterations a stage idles, (P - 1) / (M + P - 1); "
        "ma_separation: xfer = hidden states crossing between its two sub-meshes, fan = the "
        "experts' output copied on to the rest of its slice of attention devices (then gathered "
        "in the replica group: ag); counts per device of the mesh issuing them, bytes averaged "
        "over all devices"
    )
    return f"{title}\n\n{table(headers, rows)}\n\n{legend}"


def _compiled_table(cfg: ModelConfig, reports: Sequence[LayoutReport], phase: str) -> str:
    """A phase compiled, not run: its collectives per layer against the layout's least volume
    for it, and memory per device by part (the training step: parameters, gradients, Adam's
    state, activations)."""
    parts = TRAIN_MEMORY if phase == "train" else ("temporaries", "total")
    headers = (
        "strategy",
        "mesh",
        "collectives/layer",
        "sent/layer/device",
        "minimum/layer",
        "vs minimum",
        *(p.replace("optimizer_state", "adam").replace("_", " ") for p in parts),
    )
    rows = [
        (
            r.strategy,
            _mesh_cell(r.mesh),
            _collectives_cell(r),
            human_bytes(r.bytes_per_layer),
            human_bytes(r.minimum_bytes_per_layer),
            f"{r.bytes_vs_minimum:.3f}",
            *(human_bytes(r.memory.get(p, 0)) for p in parts),
        )
        for r in reports
    ]
    what = {
        "train": "the training step (forward, backward, AdamW) compiled, per layer: the whole "
        "step's collectives / layers (gradient reductions included); minimum: twice the forward "
        "pass's, the MoE gates' gradients, the vocabulary-parallel embedding, LM head and loss, "
        "and each parameter's gradient all-reduce over its copies",
        "prefill": "prefill compiled (collectives in the layer loop)",
        "decode": "one decode step compiled (collectives in the layer loop)",
    }[phase]
    title = (
        f"{cfg.name}: {cfg.n_layers} layers ({cfg.n_moe_layers} MoE), D {cfg.d_model}, "
        f"B {cfg.batch} x S {cfg.seq_len}, {cfg.dtype}; {what}; memory per device "
        f"(ma_separation: its busier mesh's)"
    )
    gaps = "".join(f"\n{r.strategy} sends more than its minimum: {r.gap}" for r in reports if r.gap)
    return f"{title}\n\n{table(headers, rows)}\n\n{MINIMUM}{gaps}"


def _rate(figures: dict | None, phase: str) -> str:
    """A phase's headline figure: prefill tokens/s, decode ms per output token."""
    if not figures:
        return "-"
    if phase == "prefill" or figures.get("tpot_ms") is None:
        return f"{figures['tps']:,.0f} tok/s" if "tps" in figures else "-"
    return f"{figures['tpot_ms']:.3g} ms"


def _versus(row: dict) -> str:
    """The claim against the overlapped bound: a claim above what the hardware allows is flagged."""
    claimed, bound = row.get("claimed"), row.get("bound")
    if not claimed or not bound:
        return "-"
    parts = []
    if "tps" in claimed:
        parts.append(f"{claimed['tps'] / bound['tps']:.0%} of bound TPS")
    if "tpot_ms" in claimed:
        parts.append(f"bound/claim TPOT {bound['tpot_ms'] / claimed['tpot_ms']:.2f}")
    flag = "IMPOSSIBLE: " if row["claim_exceeds_bound"] else ""
    return flag + "; ".join(parts)


def _claim_cell(claimed: dict | None) -> str:
    if not claimed:
        return "-"
    cells = []
    if "tps" in claimed:
        cells.append(f"{claimed['tps']:,.0f} tok/s")
    if "tpot_ms" in claimed:
        cells.append(f"{claimed['tpot_ms']:g} ms")
    return ", ".join(cells)


def experiment_table(exp, scale: str, hw, rows: Sequence[dict]) -> str:
    cfg = exp.config(scale)
    models = any(r.get("model") for r in rows)  # claims for the paper's other models: a column
    counts = sorted({r.get("devices") for r in rows} - {None})
    several = len(counts) > 1  # each row names its device count and the profile of its bound
    profiles = {r["hardware"] for r in rows if r.get("hardware")}
    headers = (
        *(("devices",) if several else ()),
        "strategy",
        *(("model",) if models else ()),
        "phase",
        "measured here",
        "bound" if several else f"bound {profiles.pop() if len(profiles) == 1 else hw.name}",
        "comm exposed",
        "limited by",
        "claimed",
        "claim vs bound",
        "memory/device",
        "fits",
    )
    body, errors = [], {}
    for r in rows:
        first = (
            *((f"{r['devices']} ({r['hardware']})",) if several else ()),
            r["strategy"],
            *((r.get("model") or "-",) if models else ()),
        )
        if r.get("error"):
            who = " ".join([r["strategy"], *([r.get("model") or "-"] if models else [])])
            errors[f"{who} on {r['devices']}" if several else who] = r["error"]
            body.append((*first, r["phase"], "-", "-", "-", "(see below)",
                         _claim_cell(r["claimed"]), "-", "-", "-"))  # fmt: skip
            continue
        measured = _rate(r["measured"], r["phase"])
        if r.get("same_tokens_as_one_device") is False:
            measured += " (TOKENS DIFFER)"
        memory = r["memory_bytes_per_device"]
        body.append(
            (
                *first,
                f"{r['phase']} (B {r['batch']})",
                measured,
                _rate(r["bound"], r["phase"]),
                _rate(r["bound_serial"], r["phase"]),
                r["limit"],
                _claim_cell(r["claimed"]),
                _versus(r),
                human_bytes(memory),
                "yes" if r["fits"] else f"NO: over {human_bytes(hw.hbm_bytes)}",
            )
        )
    experts = (
        f", {cfg.n_experts} experts top-{cfg.top_k} ({cfg.expert_form}, "
        f"{2 if cfg.expert_form == 'gelu' else 3} matrices), capacity {cfg.capacity_factor}"
        if cfg.is_moe
        else ", dense"
    )
    title = (
        f"{exp.name} ({exp.title}), {scale}: {cfg.n_layers} layers{experts}, D {cfg.d_model}, "
        f"{cfg.n_heads}x{cfg.head_dim} heads, F {cfg.d_ff}, B {cfg.batch} x S {cfg.seq_len}, "
        f"{cfg.dtype}; bound on {hw.description}"
    )
    legend = (
        "bound: the roofline floor with communication overlapped (comm exposed: added after "
        "compute); prefill in tokens/s, decode in ms per output token at a full cache of S "
        "positions; measured: median on this machine's CPU devices"
    )
    if several:
        legend += (
            "; devices: the layouts' device count and the GPUs of the bound (the paper's, as "
            "many, in nodes of its size)"
        )
    if models:
        own = next(r["model"] for r in rows if r.get("model"))
        legend += (
            f"; model: {own} is the one above, the others differ from it only as named (each "
            "compiled for the strategies and phases the paper claims for it)"
        )
    notes = "".join(f"\n{name}: {error}" for name, error in errors.items())
    parts = [f"{title}\n\n{table(headers, body)}\n\n{legend}{notes}"]
    scaling = _scaling_table(exp, rows)
    if scaling:
        parts.append(scaling)
    claimed_at = sorted({c.devices or exp.n_devices for c in exp.claims} - set(counts))
    if scale == "full" and counts and claimed_at:
        every = ",".join(str(n) for n in sorted({*counts, *claimed_at}))
        parts.append(
            f"not shown: the paper's claims at {', '.join(map(str, claimed_at))} devices "
            f"(--devices {every} shows them)"
        )
    return "\n\n".join(parts)


def _scaling_table(exp, rows: Sequence[dict]) -> str:
    """The bound's own scaling efficiency beside the claims', per row that has one."""
    scaled = [r for r in rows if r.get("scaling")]
    if not scaled:
        return ""

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    body = []
    for r in scaled:
        sc = r["scaling"]
        (lo, hi), (lo_batch, hi_batch) = sc["devices"], sc["batch"]
        small, large = (r["strategy"], r["compares"])
        if r["devices"] != lo:
            small, large = large, small
        body.append(
            (
                f"{small} -> {large}",
                sc["kind"] or "-",
                f"{lo} -> {hi}",
                str(lo_batch) if lo_batch == hi_batch else f"{lo_batch} -> {hi_batch}",
                percent(sc["bound_efficiency"]),
                percent(sc["claimed_efficiency"]),
            )
        )
    headers = ("layouts", "scaling", "devices", "batch", "bound's efficiency", "claimed")
    legend = (
        f"scaling efficiency of {exp.phase_of_tps} TPS: (TPS on the larger count / TPS on the "
        "smaller) / (larger count / smaller); strong: the same batch, weak: the batch grown with "
        "the devices. The bound's: the roofline bounds above scaled, not a measurement; claimed: "
        "the paper's figures (derived ones included)"
    )
    return f"{table(headers, body)}\n\n{legend}"


def device_table(cfg: ModelConfig, device, hw, rows: Sequence[dict]) -> str:
    headers = ("phase", "measured", f"bound {hw.name}", "of bound", "MFU", "HBM bandwidth")
    body = [
        (
            r["phase"],
            _rate(r["measured"], r["phase"]),
            _rate(r["bound"], r["phase"]),
            f"{r['fraction_of_bound']:.1%}",
            f"{r['mfu']:.1%} ({r['flops_per_s'] / 1e12:.3g} TFLOP/s)",
            f"{r['hbm_bandwidth_fraction']:.1%} ({r['hbm_bytes_per_s'] / 1e9:.3g} GB/s)",
        )
        for r in rows
    ]
    title = (
        f"{cfg.name} on {device.platform} device {device.id} ({device.device_kind}), "
        f"B {cfg.batch} x S {cfg.seq_len}, {cfg.dtype}; bound: {hw.description}"
    )
    legend = (
        "MFU: the program's matmul FLOP/s over the peak; HBM bandwidth: the bytes it must move "
        "(weights, cache, new outputs) per second over the peak"
    )
    return f"{title}\n\n{table(headers, body)}\n\n{legend}"


PHASE_TITLES = {
    "forward": "the forward pass",
    "train": "the training step (forward, backward, optimizer; per layer: the step's / layers)",
    "prefill": "prefill",
    "decode": "one decode step",
}


def _spec(spec: list) -> str:
    parts = ["x".join(p) if isinstance(p, list) else (p or "-") for p in spec]
    return "(" + ", ".join(parts) + ")"


def explain_text(doc: dict) -> str:
    mesh = doc["mesh"]
    if all(isinstance(v, dict) for v in mesh.values()):
        mesh_text = " + ".join(
            f"{name}: " + "x".join(f"{a}={n}" for a, n in sub.items()) for name, sub in mesh.items()
        )
    else:
        mesh_text = "x".join(f"{a}={n}" for a, n in mesh.items())
    params = table(
        ("parameter", "shape", "logical axes", "partition spec", "bytes/device"),
        [
            (
                p["path"] + (f" [{p['mesh']}]" if "mesh" in p else ""),
                "x".join(map(str, p["shape"])),
                _spec(p["logical_axes"]),
                _spec(p["spec"]),
                human_bytes(p["bytes_per_device"]),
            )
            for p in doc["parameters"]
        ],
    )
    collectives = table(
        ("collective", "mesh axes", "where", "count", "sent/device"),
        [
            (
                f"{c['kind']} ({SHORT[c['kind']]})" + (f" [{c['mesh']}]" if "mesh" in c else ""),
                c["axes"],
                c["where"],
                f"{c['count']:g}",
                human_bytes(c["bytes_per_device"]),
            )
            for c in doc["collectives"]
        ]
        or [("none", "-", "-", "0", "0 B")],
    )
    memory = table(
        ("memory per device", "bytes"),
        [(k.replace("_", " "), human_bytes(v)) for k, v in doc["memory_per_device"].items()],
    )
    counts = (
        f"parameters: {doc['params_total']:,} in total, {doc['params_active']:,} active per token"
    )
    return (
        f"{doc['strategy']} on {mesh_text}\n{counts}\n\n{params}\n\n"
        f"collectives of {PHASE_TITLES[doc['phase']]}\n\n{collectives}\n\n{memory}"
    )


SHOWN_REFUSALS = 8


def _floor(row) -> str:
    """A plan row's floor of weights and cache (Adam's state too, training), and the compiled
    program's memory as a multiple of it."""
    if row.floor_bytes_per_device is None:
        return "-"
    ratio = row.memory_bytes_per_device / row.floor_bytes_per_device
    return f"{human_bytes(row.floor_bytes_per_device)} (x{ratio:.2f})"


def plan_table(plan, prefill_batch: int, top: int | None = None) -> str:
    """`jaxmoe.plan.Plan` as the command prints it: what the search did, each phase's ranking
    (its `top` rows) and which device order won where several were compiled (`name@a-b`: mesh
    axes laid outermost first as a, b, so b's groups are neighbours), then who cannot run."""
    cfg, hw = plan.config, plan.hardware
    pruned = sum(len(p) for p in plan.pruned.values())
    parts = [
        f"plan for {cfg.name}: {cfg.n_layers} layers, D {cfg.d_model}, B {cfg.batch} x S "
        f"{cfg.seq_len}, {cfg.dtype}, on {plan.n_devices} of {hw.description} "
        f"({hw.name}; bounds: nothing run)",
        f"{plan.considered} layouts considered, {len(plan.cannot_split)} cannot split the "
        f"model, {pruned} (layout, phase) pairs pruned by memory or estimate, "
        f"{plan.compiled} programs compiled",
    ]
    units = {"prefill": "tokens/s", "decode": "ms per output token", "train": "tokens/s"}
    for phase in (p for p in ("prefill", "decode", "train") if p in plan.pruned):
        headers = (
            *("rank", "strategy", "bound", "estimate", "memory/device"),
            "weights+Adam" if phase == "train" else "weights+cache",
            *("fits", "why"),
        )
        body = [
            (
                str(r.rank),
                r.strategy,
                f"{r.tpot_ms:.3g} ms" if phase == "decode" else f"{r.tps:,.0f} tok/s",
                "-" if r.estimated_seconds is None else f"{r.estimated_seconds * 1e3:.3g} ms",
                human_bytes(r.memory_bytes_per_device),
                _floor(r),
                "yes" if r.fits else "NO",
                r.reason,
            )
            for r in plan.ranking(phase)[:top]
        ]
        batch = min(cfg.batch, prefill_batch) if phase == "prefill" else cfg.batch
        name = "training step" if phase == "train" else phase
        parts.append(f"{name} (B {batch}, {units[phase]}):\n\n{table(headers, body)}")
        seconds = {r.strategy: r.seconds for r in plan.ranking(phase)}
        for best, others in plan.device_orders(phase):
            tied = [o for o in others if seconds[o] <= seconds[best] * (1 + 1e-3)]
            how = f"ties with {', '.join(tied)}" if tied else f"ranks above {', '.join(others)}"
            parts.append(f"device order for {name}: {best} {how}")
        unranked: dict[str, list[str]] = {}  # why -> the layouts it holds for
        for layout, reason in plan.cannot_rank[phase].items():
            base = layout.split(" (")[0]  # a variant's name: the layout's and what it changes
            unranked.setdefault(reason.removeprefix(f"{base}: "), []).append(layout)
        for reason, layouts in unranked.items():
            parts.append(f"not ranked for {name}: {', '.join(layouts)}: {reason}")
    shown = list(plan.cannot_split.items())
    for name, reason in shown[:SHOWN_REFUSALS]:
        parts.append(f"{name}: cannot run this model: {reason}")
    if len(shown) > SHOWN_REFUSALS:
        parts.append(f"... and {len(shown) - SHOWN_REFUSALS} more that cannot (--json says why)")
    return "\n\n".join(parts)

"""Write `docs/strategies.md`: a page per strategy, its mesh, rules, collectives and bound.

    python -m experiments.strategy_docs [--out docs/strategies.md] [--platform P --devices N]

Everything on the page comes from the code and the compiled programs: the mesh and the rules from
the strategy value, the why from its module's docstring, the collectives per layer from compiling
`tiny_moe` under it (`compare`), the bound from `plan` on paper 000's model and the H100 x16
profile. Run it again after changing a strategy; a test checks the rules on the page are the
code's. It lays the models over 16 devices: virtual CPU devices unless there are 16 GPUs or TPUs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from experiments.configs import DEVICES, platform_flags
from jaxmoe import platform
from jaxmoe.config import ConfigError

PAGE = Path(__file__).resolve().parent.parent / "docs" / "strategies.md"
PLAN = ("paper000", "h100x16")


def rules_table(strategy) -> str:
    rows = [f"| `{axis}` | {' x '.join(f'`{a}`' for a in mesh_axes)} |"
            for axis, mesh_axes in strategy.rules.items()]  # fmt: skip
    return "| logical axis | mesh axes |\n|---|---|\n" + "\n".join(rows)


def _mesh(strategy) -> str:
    return " x ".join(f"{name}={size}" for name, size in strategy.mesh_shape)


def page(devices: Sequence[jax.Device]) -> str:
    import jaxmoe
    import meshes
    from experiments import plan_cmd
    from jaxmoe.report import SHORT, human_bytes

    reports = {r.strategy: r for r in jaxmoe.compare("tiny_moe", devices=devices).reports}
    model = plan_cmd.plan_config(PLAN[0], [], None, None)
    planned = jaxmoe.plan(
        model, PLAN[1], list(meshes.LAYOUTS), devices=devices, phases=("prefill", "decode")
    ).rows
    parts = [
        "# Strategies\n\nOne section per layout: its mesh, the rules that map the model's logical "
        "axes (`jaxmoe/axes.py`) onto mesh axes, why its collectives are what they are (the "
        "module's docstring), the collectives XLA put in each layer of `tiny_moe`'s forward pass, "
        f"and its bound for paper 000's model on `{PLAN[1]}` (from `plan`). Written by "
        "`python -m experiments.strategy_docs`; do not edit by hand."
    ]
    for name, layout in meshes.LAYOUTS.items():
        module = importlib.import_module(_module_of(name))
        r = reports[name]
        collectives = ", ".join(
            f"{count:g} {SHORT[kind]} ({human_bytes(sent)})"
            for kind, (count, sent) in r.per_layer.items()
            if count
        )
        bound = sorted(
            (row for row in planned if row.strategy == name), key=lambda r: r.phase != "prefill"
        )
        bound_text = "; ".join(
            f"{row.phase}: "
            + (
                f"{row.tps:,.0f} tokens/s"
                if row.phase == "prefill"
                else f"{row.tpot_ms:.3g} ms per token"
            )
            + f", limited by {row.limit}, {human_bytes(row.memory_bytes_per_device)} "
            f"per device{'' if row.fits else ' (does not fit)'}"
            for row in bound
        )
        on = layout.strategies  # each mesh's rules, by the mesh's role
        if len(on) == 1:
            (strategy,) = on.values()
            mesh, rules = _mesh(strategy), rules_table(strategy)
        else:
            mesh = " + ".join(f"{_mesh(s)} ({role})" for role, s in on.items())
            rules = "\n\n".join(
                f"{role.capitalize()} mesh:\n\n{rules_table(s)}" for role, s in on.items()
            )
        parts.append(
            f"## `{name}`\n\n{layout.description}.\n\n**Mesh:** {mesh}\n\n{rules}\n\n"
            f"**Why:** {(module.__doc__ or '').strip()}\n\n"
            f"**Collectives per layer** (tiny_moe, forward, per device): {collectives or 'none'}; "
            f"{r.bytes_vs_minimum:.3f} x the least volume the layout needs.\n\n"
            f"**Bound** (paper 000, {PLAN[1]}): {bound_text or 'cannot run this model'}."
        )
    return "\n\n".join(parts) + "\n"


def _module_of(name: str) -> str:
    """The `meshes` module that defines a layout (by the part of its name before any `:`)."""
    base = name.split(":")[0]
    return f"meshes.{ {'heads_dims_4x4': 'heads_dims'}.get(base, base) }"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.strategy_docs")
    parser.add_argument("--out", type=Path, default=PAGE)
    platform_flags(parser, f"devices to lay the models over (default {DEVICES})", DEVICES)
    args = parser.parse_args(argv)
    try:
        chosen = platform.select(args.platform, args.devices, compile_only=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page(chosen.devices))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

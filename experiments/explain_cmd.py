"""`explain STRATEGY`: per parameter, per layer and per device, what a layout does to a model."""

from __future__ import annotations

import argparse
import json

import jax

import meshes
from experiments.configs import DEVICES, config
from experiments.report import SHORT, human_bytes, table
from jaxmoe.config import with_overrides
from jaxmoe.explain import explain
from jaxmoe.paths import writable_file

PHASE_TITLES = {
    "forward": "the forward pass",
    "train": "the training step (forward, backward, optimizer; per layer: the step's / layers)",
    "prefill": "prefill",
    "decode": "one decode step",
}


def _spec(spec: list) -> str:
    parts = ["x".join(p) if isinstance(p, list) else (p or "-") for p in spec]
    return "(" + ", ".join(parts) + ")"


def text(doc: dict) -> str:
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
    return (
        f"{doc['strategy']} on {mesh_text}\n\n{params}\n\n"
        f"collectives of {PHASE_TITLES[doc['phase']]}\n\n{collectives}\n\n{memory}"
    )


def run(args: argparse.Namespace) -> None:
    cfg = with_overrides(config(args.config), assignments=args.set)
    layout = meshes.get(args.strategy)
    if args.json:
        writable_file(args.json, "--json")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", DEVICES)
    doc = explain(cfg, layout, jax.devices(), args.phase)
    print(text(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"\nwrote {args.json}")

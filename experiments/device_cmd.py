"""`device`: one model on one device of whatever platform JAX finds (a GPU where there is one),
timed and set against that device's roofline: the fraction of the bound reached, as prefill MFU
(matmul FLOP/s over the peak) and decode HBM bandwidth (bytes that must move over the peak).

    python -m experiments.run device --config bench_moe --hardware h100x1

On a machine without an accelerator it runs on the CPU, and the fractions are against the
named profile's peaks, not the CPU's: say `--hardware` for the device you run on. `--platform`
chooses the platform (as for every command).
"""

from __future__ import annotations

import argparse
import json

import meshes
from experiments.configs import config, timing
from jaxmoe import platform, report
from jaxmoe.analysis import hardware
from jaxmoe.config import with_overrides
from jaxmoe.memory_check import check_fits, device_memory_bytes
from jaxmoe.paths import writable_file
from jaxmoe.phases import Measure, phase_costs


def run(args: argparse.Namespace) -> None:
    cfg = with_overrides(config(args.config), assignments=args.set)
    hw = hardware.get(args.hardware)
    timing(args.warmup, args.iters)
    if args.json:
        writable_file(args.json, "--json")
    device = platform.select(args.platform, args.devices).devices[0]
    check_fits(cfg, device_memory_bytes(device), cache=True, where=f"on {device.platform} device 0")
    costs = phase_costs(
        cfg,
        meshes.ONE_DEVICE,
        [device],
        hw,
        prefill_batch=cfg.batch,
        measure=Measure(args.warmup, args.iters),
    )
    rows = []
    for c in costs:
        seconds = c.measured.median
        rows.append(
            {
                "phase": c.phase,
                "measured": {**c.rate(seconds), **c.measured.summary()},
                "bound": {**c.rate(c.bound.overlapped_s), "seconds": c.bound.overlapped_s},
                "flops_per_s": c.bound.flops / seconds,
                "mfu": c.bound.compute_s / seconds,
                "hbm_bytes_per_s": c.bound.hbm_bytes / seconds,
                "hbm_bandwidth_fraction": c.bound.memory_s / seconds,
                "fraction_of_bound": c.bound.overlapped_s / seconds,
            }
        )
    print(report.device_table(cfg, device, hw, rows))
    if args.json:
        doc = {"config": cfg.name, "device": str(device), "hardware": hw.name, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"\nwrote {args.json}")

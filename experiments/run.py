"""`python -m experiments.run [COMMAND] [options]`: the project's commands.

  compare (the default)  lay one model over every registered strategy on 16 devices, check
                         each against the one-device forward pass, print one table
  train                  train on C4 with the papers' recipe under one strategy; resumable
  experiment             a paper's setup: TPS and TPOT measured (tiny) or compiled (full), each
                         beside its roofline bound on the paper's hardware and the paper's claim
  device                 one model on one device of the platform at hand (a GPU where there is
                         one): measured against that device's bound, MFU and HBM bandwidth
  explain STRATEGY       per parameter its logical axes, partition spec and bytes per device;
                         per layer its collectives; memory per device
  plan                   which placement for a model on a machine: every strategy (and
                         ma_separation split) ranked by its bound for prefill and decode

Every command runs on the platform JAX finds (TPU or GPU where present, else the CPU) or the one
`--platform` names, on `--devices N` of it: by default every GPU or TPU device, or 16 virtual CPU
devices (16 / --num-processes per process), made by the program itself (no XLA_FLAGS). plan,
explain and experiment --scale full only compile: with fewer accelerators than they compile for,
they compile on virtual CPU devices (a `note:` says so).
"""

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import meshes
from experiments import (
    compare_cmd,
    device_cmd,
    experiment_cmd,
    explain_cmd,
    plan_cmd,
    train_cmd,
)
from experiments.configs import DEVICES, platform_flags
from jaxmoe import watch
from jaxmoe.config import DEFAULT_PRESET, ConfigError
from jaxmoe.layout import PHASES
from jaxmoe.plan import COMPILE_TOP
from jaxmoe.plan import PHASES as PLAN_PHASES
from jaxmoe.train.loop import TrainingDiverged, TrainingFailed, TrainingInterrupted

COMMANDS = ("compare", "train", "experiment", "device", "plan", "explain")
LOSS_GRACE_S = 5.0  # how long a failed command waits to learn whether a peer process was lost
COMPILE_DEVICES = (
    f"devices to lay the model over (default {DEVICES}); virtual CPU devices when it only "
    "compiles and the GPUs or TPUs here are fewer"
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_PRESET, help="a named configuration")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )


def _phase(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--phase", choices=PHASES, default="forward", help=what)


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line naming it (argparse prints a usage block first), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    strategies = "\n".join(f"  {s.name:<20} {s.description}" for s in meshes.LAYOUTS.values())
    parser = _Parser(
        prog="python -m experiments.run",
        description=__doc__,
        epilog=f"strategies:\n{strategies}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command")
    compare = commands.add_parser("compare", help="the layout table (default)")
    _common(compare)
    platform_flags(
        compare,
        "devices in all (default: 16 virtual CPU devices, or as many GPU or TPU devices as the "
        "strategies use)",
    )
    compare.add_argument(
        "--strategies",
        help="comma-separated; ma_separation:A+X[/R] for another sub-mesh split (default: every "
        "registered layout that can split the model, the others listed with the reason)",
    )
    compare.add_argument(
        "--transfer-bits",
        type=int,
        default=0,
        choices=(0, 8),
        help="ma_separation: hidden states cross between the meshes as int8 (8) or not (0)",
    )
    compare.add_argument("--json", type=Path, help="also write the results here as JSON")
    compare.add_argument("--seed", type=int, default=0)
    _phase(compare, "forward: run and held against one device; others compiled only")

    train = commands.add_parser("train", help="train on C4 (resumes from --workdir)")
    _common(train)
    platform_flags(
        train,
        "devices in all processes (default: 16 virtual CPU devices, or every GPU or TPU device "
        "of each process)",
    )
    train.add_argument("--strategy", default="ep16", help="one registered strategy")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--workdir", type=Path, default=Path("runs/train"))
    train.add_argument("--data", type=Path, help="C4 json(.gz) file or directory of shards")
    train.add_argument("--valid", type=Path, help="held-out file or directory")
    train.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json")
    train.add_argument("--eval-every", type=int, default=50)
    train.add_argument("--save-every", type=int, default=100)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process: process 0")
    train.add_argument("--num-processes", type=int, default=1)
    train.add_argument("--process-id", type=int, default=0)
    train.add_argument(
        "--init-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="multi-process: give up when the coordinator or a peer is not there by then",
    )

    experiment = commands.add_parser(  # resolve: its --devices (a list) replaces the shared one
        "experiment", help="a paper's setup against its bounds", conflict_handler="resolve"
    )
    experiment.add_argument("name", help="paper000 ... paper004, or all")
    experiment.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    experiment.add_argument("--hardware", help="a hardware profile (default: the paper's)")
    experiment.add_argument("--warmup", type=int, default=3, help="untimed calls (papers: 100)")
    experiment.add_argument("--iters", type=int, default=20, help="timed calls (papers: 1000)")
    experiment.add_argument("--json", type=Path, help="also write the rows here as JSON")
    experiment.add_argument("--plots", type=Path, help="write a PNG per experiment here")
    platform_flags(experiment, COMPILE_DEVICES, DEVICES)
    experiment.add_argument(
        "--devices",
        metavar="N[,N...]",
        help=f"device counts, comma-separated (default: the paper's own, {DEVICES}): the paper at "
        "each, bounded on as many of its hardware's GPUs (paper002 scales its layouts to 8,16,32 "
        "for its scaling claims); virtual CPU devices, as many as the largest, when it only "
        "compiles and the GPUs or TPUs here are fewer",
    )

    device = commands.add_parser("device", help="one device's share of its roofline")
    device.add_argument("--config", default="bench_moe", help="a named configuration")
    device.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    device.add_argument("--hardware", default="h100x1", help="the profile of the device used")
    device.add_argument("--warmup", type=int, default=10)
    device.add_argument("--iters", type=int, default=50)
    device.add_argument("--json", type=Path, help="also write the rows here as JSON")
    platform_flags(
        device,
        "devices to set up (default: 16 virtual CPU devices, or every GPU or TPU device); it "
        "runs on the first",
    )

    plan = commands.add_parser(
        "plan", help="search the layouts of the devices, rank the best by their bound"
    )
    plan.add_argument(
        "--config",
        default="paper000",
        help="a preset, a paper (its full model), a shipped model (mixtral-8x7b) or a config.json",
    )
    plan.add_argument(
        "--hardware",
        default="h100x16",
        help="a hardware profile or cluster <gpu>x<count>[n<per_node>] (h100x64, b200x72n72)",
    )
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--batch", type=int, help="sequences (default: the config's)")
    plan.add_argument("--seq", type=int, help="context length (default: the config's)")
    plan.add_argument(
        "--strategies",
        help="comma-separated candidates (default: every composition of parallelism axes of the "
        "devices, and ma_separation splits)",
    )
    plan.add_argument("--json", type=Path, help="also write the ranking here as JSON")
    plan.add_argument("--top", type=int, help="show the best K of each phase (default: all)")
    plan.add_argument(
        "--compile-top",
        type=int,
        help=f"compile the best K estimates of each phase (default {COMPILE_TOP}; every "
        f"candidate named with --strategies)",
    )
    plan.add_argument(
        "--phases",
        default=",".join(PLAN_PHASES),
        help=f"comma-separated phases to rank (default {','.join(PLAN_PHASES)})",
    )
    platform_flags(
        plan,
        "devices to lay the model over (default: the --hardware profile's GPUs); virtual CPU "
        "devices when it only compiles and the GPUs or TPUs here are fewer",
    )

    explain = commands.add_parser(
        "explain", help="what a strategy does to the model, per parameter"
    )
    explain.add_argument("strategy", help="a registered strategy or ma_separation[:A+X[/R]]")
    explain.add_argument("--config", default=DEFAULT_PRESET, help="a named configuration")
    explain.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    explain.add_argument("--json", type=Path, help="also write the explanation here as JSON")
    _phase(explain, "the program explained")
    platform_flags(explain, COMPILE_DEVICES, DEVICES)

    argv = list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "compare")
    return parser.parse_args(argv)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler's stop) ends a run as Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt)
    notes = logging.StreamHandler(sys.stdout)  # the library's notes (a resume that changed
    notes.setFormatter(logging.Formatter("note: %(message)s"))  # fields, a damaged checkpoint)
    library = logging.getLogger("jaxmoe")
    library.addHandler(notes)
    propagate, library.propagate = library.propagate, False  # a root handler would print twice
    try:
        return _run(args)
    finally:  # called again in the same process (tests, notebooks), it adds no second handler
        library.removeHandler(notes)
        library.propagate = propagate


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":
            train_cmd.run(args)
        elif args.command == "experiment":
            experiment_cmd.run(args)
        elif args.command == "device":
            device_cmd.run(args)
        elif args.command == "plan":
            plan_cmd.run(args)
        elif args.command == "explain":
            explain_cmd.run(args)
        else:
            compare_cmd.run(args)
    except (ConfigError, TrainingFailed) as err:
        return _failed(f"error: {err}", 2)
    except TrainingDiverged as err:
        return _failed(f"error: {err}", 3)
    except TrainingInterrupted as err:
        return _failed(f"error: {err}", 130)
    except KeyboardInterrupt:
        return _failed("error: interrupted; nothing was lost; run the same command again", 130)
    except Exception as err:
        watch.hold_if_lost(LOSS_GRACE_S)  # a collective failed as a peer died: say that instead
        watch.leave(failed=f"error: {type(err).__name__}: {err}")
        raise
    return 0


def _failed(line: str, code: int) -> int:
    """Say the error line; the other processes of a run stop with it (`watch.leave`)."""
    print(line, file=sys.stderr)
    watch.leave(failed=line)
    return code


if __name__ == "__main__":
    sys.exit(main())

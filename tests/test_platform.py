"""Which platform and devices every command runs on (`jaxmoe.platform`), with JAX's platforms
faked: this process keeps its 16 CPU devices, and nothing here compiles."""

import logging
import os
import re
import signal
from pathlib import Path

import jax
import pytest

from experiments import run
from experiments.configs import enough_devices
from jaxmoe import platform, runtime
from jaxmoe.config import ConfigError
from jaxmoe.platform import Choice, Platform

ROOT = Path(__file__).resolve().parent.parent
GPU_HERE = {"gpu": 8, "cpu": 16}


@pytest.fixture
def fake_jax(monkeypatch):
    """jax.config.update recorded, not applied; `jax.devices(p)` gives strings named after p;
    a GPU is JAX's default backend."""
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    monkeypatch.setattr(jax, "devices", lambda name: [f"{name}{i}" for i in range(16)])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    return updates


# ---- the choice, with the platforms found faked -----------------------------------------------
def test_a_gpu_present_is_used_and_the_cpu_not_forced(fake_jax):
    chosen = platform.select(None, None, found=GPU_HERE)
    assert chosen == Platform("gpu", tuple(f"gpu{i}" for i in range(8))) and not chosen.virtual
    assert fake_jax == [("jax_num_cpu_devices", 16)]  # no jax_platforms: the GPU may start
    assert platform.select(None, 4, found=GPU_HERE).devices == ("gpu0", "gpu1", "gpu2", "gpu3")


def test_no_gpu_gives_16_virtual_cpu_devices(fake_jax):
    chosen = platform.select(None, None, found={"cpu": 16})
    assert chosen.name == "cpu" and len(chosen.devices) == 16 and chosen.virtual
    assert ("jax_num_cpu_devices", 16) in fake_jax


def test_a_forced_cpu_ignores_the_gpu_and_never_starts_it(fake_jax):
    chosen = platform.select("cpu", 8, found=GPU_HERE)
    assert chosen.name == "cpu" and len(chosen.devices) == 8
    assert fake_jax[:2] == [("jax_num_cpu_devices", 8), ("jax_platforms", "cpu")]


def test_xla_cpu_flags_are_added_and_a_users_own_kept(fake_jax, monkeypatch):
    (name, value), *_ = platform.CPU_FLAGS.items()
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    platform.select(None, None, found={"cpu": 16})
    assert os.environ["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", f"{name}={value}"]
    monkeypatch.setenv("XLA_FLAGS", f"{name}=true")  # the user's choice stands
    platform.select(None, None, found={"cpu": 16})
    assert os.environ["XLA_FLAGS"] == f"{name}=true"


def test_tpu_comes_before_gpu():
    assert platform.choose(None, None, {"tpu": 4, **GPU_HERE}) == Choice("tpu", 4)
    assert platform.choose("gpu", None, {"tpu": 4, **GPU_HERE}) == Choice("gpu", 8)


@pytest.mark.parametrize(
    ("requested", "devices", "found", "compile_only", "needles"),
    [
        ("gpu", None, {"cpu": 16}, False, ["--platform gpu: JAX finds no gpu", '".[cuda]"',
                                           "--platform cpu"]),
        ("tpu", 8, {"cpu": 16}, True, ["--platform tpu: JAX finds no tpu", "jax[tpu]"]),
        ("metal", None, {"cpu": 16}, False, ["--platform metal: choose one of cpu, gpu, tpu"]),
        (None, 16, GPU_HERE, False, ["--devices 16: only 8 gpu devices here; run with --devices 8,"
                                     " or --platform cpu for 16 virtual CPU devices"]),
        ("gpu", 16, GPU_HERE, True, ["--devices 16: only 8 gpu devices"]),  # forced: no fallback
        (None, 32, {"cpu": 16}, False, ["--devices 32: only 16 cpu devices here; run with "
                                        "--devices 16"]),
    ],
)  # fmt: skip
def test_what_cannot_be_had_is_one_line(requested, devices, found, compile_only, needles):
    with pytest.raises(ConfigError) as err:
        platform.choose(requested, devices, found, compile_only=compile_only)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message
    if found == {"cpu": 16} and requested is None:
        assert "--platform cpu" not in message  # already on the CPU


def test_a_device_count_below_one_is_refused_before_anything_is_set(fake_jax):
    with pytest.raises(ConfigError, match="--devices 0: must be at least 1"):
        platform.select(None, 0, found=GPU_HERE)
    assert fake_jax == []


def test_compiling_only_falls_back_to_virtual_cpu_devices_with_a_note(
    fake_jax, monkeypatch, caplog
):
    monkeypatch.setattr(logging.getLogger("jaxmoe"), "propagate", True)  # the CLI turns it off
    with caplog.at_level(logging.WARNING, logger="jaxmoe.platform"):
        chosen = platform.select(None, 16, compile_only=True, found=GPU_HERE)
    assert chosen.name == "cpu" and len(chosen.devices) == 16
    (note,) = caplog.messages
    assert "16 devices to compile for, 8 gpu devices here" in note and "virtual CPU" in note
    assert ("jax_default_device", "cpu0") in fake_jax  # not the GPU, for arrays made in passing
    assert platform.select(None, 8, compile_only=True, found=GPU_HERE).name == "gpu"


def test_this_process_really_has_32_cpu_devices():
    assert platform.available() == {"cpu": 32}  # conftest forces the CPU
    chosen = platform.select("cpu", 32)  # the same settings as conftest's: nothing changes
    assert chosen.devices == tuple(jax.devices()) and chosen.virtual
    assert platform.select("cpu", 16).devices == tuple(jax.devices()[:16])  # JAX has started


def test_fewer_gpus_than_a_layout_uses_name_the_cpu():
    with pytest.raises(ConfigError, match=r"^strategy ep16 uses 16 devices, only 8 gpu devices h"):
        enough_devices(Platform("gpu", ("gpu0",) * 8), 16, "strategy ep16")
    enough_devices(Platform("gpu", ("gpu0",) * 16), 16, "strategy ep16")
    enough_devices(Platform("cpu", ("cpu0",) * 8), 16, "strategy ep16")  # its own check says


# ---- several processes: CPU devices split before the runtime, the platform chosen after ---------
def test_runtime_sets_the_cpu_share_before_starting_and_chooses_after(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "configure", lambda *a: calls.append(("configure", *a)))
    monkeypatch.setattr(runtime, "_join", lambda *a: calls.append(("join",)) or 2)
    monkeypatch.setattr(runtime.watch, "join", lambda *a: calls.append(("watch", *a[:2])))
    monkeypatch.setattr(runtime.watch, "leave_at_exit", lambda: calls.append(("leave at exit",)))
    monkeypatch.setattr(runtime, "_initialize", lambda *a: calls.append(("initialize",)))
    chosen = Platform("cpu", ("cpu0",))
    monkeypatch.setattr(runtime, "attach", lambda *a: calls.append(("attach", *a)) or chosen)
    assert runtime.start(None, 2, 1, "127.0.0.1:1", 30.0) is chosen
    assert calls == [
        ("configure", None, 8),
        ("join",),
        ("watch", "127.0.0.1", 2),  # process 0's watch port, from its `go`
        ("initialize",),
        ("leave at exit",),  # after the runtime: the goodbye comes before its shutdown barrier
        ("attach", None, None),
    ]
    calls.clear()
    runtime.start(8, 1, 0, None, 30.0, "gpu")
    assert calls == [("configure", "gpu", 8), ("attach", "gpu", 8)]


def test_runtime_refuses_part_of_several_processes_gpus(monkeypatch):
    monkeypatch.setattr(runtime, "configure", lambda *a: None)
    monkeypatch.setattr(runtime, "_join", lambda *a: 2)
    monkeypatch.setattr(runtime.watch, "join", lambda *a: None)
    monkeypatch.setattr(runtime.watch, "leave_at_exit", lambda: None)
    monkeypatch.setattr(runtime, "_initialize", lambda *a: None)
    monkeypatch.setattr(runtime, "attach", lambda *a: Platform("gpu", ("gpu0",) * 8))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "device_count", lambda name: 16)
    with pytest.raises(
        ConfigError, match=r"every gpu device of each \(16 in all\); leave --devices"
    ):
        runtime.start(8, 2, 1, "127.0.0.1:1", 30.0, "gpu")


def test_the_default_16_cpu_devices_must_split_over_the_processes():
    with pytest.raises(ConfigError, match=r"16 does not split over 3 processes.*--platform gpu"):
        runtime.start(None, 3, 0, "127.0.0.1:1", 30.0)


# ---- every command goes through it -------------------------------------------------------------
class Chosen(Exception):
    """Raised where a command has its platform: nothing after it runs."""


@pytest.fixture
def recorded(monkeypatch):
    """What every command asked `jaxmoe.platform` (train through `jaxmoe.runtime`)."""
    calls = []

    def select(requested, devices, *, compile_only=False, found=None):
        calls.append(("select", requested, devices, compile_only))
        raise Chosen

    def attach(requested, devices):
        calls.append(("attach", requested, devices))
        raise Chosen

    monkeypatch.setattr(platform, "select", select)
    monkeypatch.setattr(runtime, "configure", lambda *a: calls.append(("configure", *a)))
    monkeypatch.setattr(runtime, "attach", attach)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # main's SIGTERM handler
    library = logging.getLogger("jaxmoe")
    monkeypatch.setattr(library, "handlers", [])  # main adds its `note:` printer
    monkeypatch.setattr(library, "propagate", library.propagate)
    return calls


ROUTES = [  # what each command asks for, with and without --platform and --devices
    (["compare"], [("select", None, None, False)]),
    (["compare", "--strategies", "ma_separation:4+4", "--platform", "gpu", "--devices", "8"],
     [("select", "gpu", 8, False)]),
    (["train"], [("configure", None, 16), ("attach", None, None)]),
    (["train", "--platform", "gpu", "--devices", "8"],
     [("configure", "gpu", 8), ("attach", "gpu", 8)]),
    (["experiment", "paper000"], [("select", None, 16, False)]),
    (["experiment", "paper000", "--platform", "gpu", "--devices", "8"],
     [("select", "gpu", 8, False)]),
    (["experiment", "paper000", "--scale", "full"], [("select", None, 16, True)]),
    (["device"], [("select", None, None, False)]),
    (["device", "--platform", "gpu", "--devices", "8"], [("select", "gpu", 8, False)]),
    (["plan"], [("select", None, 16, True)]),
    (["plan", "--platform", "gpu", "--devices", "8"], [("select", "gpu", 8, True)]),
    (["explain", "ep16"], [("select", None, 16, True)]),
    (["explain", "ep16", "--platform", "gpu", "--devices", "8"], [("select", "gpu", 8, True)]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "calls"), ROUTES, ids=[" ".join(a) for a, _ in ROUTES])
def test_every_command_chooses_its_platform_there(recorded, args, calls, tmp_path):
    if args[0] == "train":
        args = [*args, f"--workdir={tmp_path / 'run'}"]
    with pytest.raises(Chosen):
        run.main(args)
    assert recorded == calls
    assert not (tmp_path / "run").exists()


def test_nothing_else_pins_a_platform():
    pinned = re.compile(r"config\.update\(\s*[\"']jax_(platforms|num_cpu_devices)[\"']")
    sources = [*(ROOT / "jaxmoe").rglob("*.py"), *(ROOT / "experiments").rglob("*.py")]
    assert len(sources) > 30
    assert [p.name for p in sources if pinned.search(p.read_text())] == ["platform.py"]

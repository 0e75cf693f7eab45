"""Training on the shipped C4 sample: the same losses under every strategy, resume after a real
SIGKILL, two processes as one, and one-line errors for bad input that lose nothing saved."""

import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

import meshes
from jaxmoe import watch
from jaxmoe.config import ConfigError, preset
from jaxmoe.layout import Layout
from jaxmoe.train.loop import RunOptions, train
from jaxmoe.train.recipe import TrainConfig
from jaxmoe.train.steps import make_trainer

# a small model on the real GPT-2 vocabulary: quick to compile under every strategy
SMALL = {"d_model": 64, "d_ff": 128, "n_heads": 16, "head_dim": 4, "seq_len": 32}
SETS = [f"--set={k}={v}" for k, v in SMALL.items()]
CURVE_STEPS = 20
CURVE_RTOL = 1e-4  # float32 reductions in another order, compounded over 20 Adam steps
CURVE_LR = 3e-3  # high enough that 20 steps move the loss: a flat curve would prove little


def losses(workdir: Path) -> dict[int, float]:
    lines = (json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())
    return {m["step"]: m["loss"] for m in lines}


def run_in_process(
    strategy: Layout, workdir: Path, save_every: int = CURVE_STEPS
) -> dict[int, float]:
    cfg = preset("tiny_moe").replace(expert_dropout=0.1, **SMALL)
    tc = TrainConfig(learning_rate=CURVE_LR).scaled_to(CURVE_STEPS)
    opts = RunOptions(
        steps=CURVE_STEPS,
        workdir=workdir,
        eval_every=CURVE_STEPS,
        save_every=save_every,
        progress=False,
    )
    train(cfg, strategy, tc, opts, jax.devices()[: strategy.n_devices])
    return losses(workdir)


@functools.cache
def one_device_curve(tmp: Path) -> dict[int, float]:
    return run_in_process(meshes.ONE_DEVICE, tmp / "one_device")


@pytest.mark.parametrize("strategy", list(meshes.LAYOUTS.values()), ids=list(meshes.LAYOUTS))
def test_every_strategy_gives_the_same_loss_curve(strategy, tmp_path_factory):
    reference = one_device_curve(tmp_path_factory.getbasetemp())
    if strategy.name in SAVED_AT_10:  # runs the resumption tests read
        curve, _ = saved_curve(tmp_path_factory.getbasetemp(), strategy.name)
    else:
        curve = run_in_process(strategy, tmp_path_factory.mktemp(strategy.name.replace(":", "-")))
    assert sorted(curve) == list(range(1, CURVE_STEPS + 1))
    for step, loss in curve.items():
        assert loss == pytest.approx(reference[step], rel=CURVE_RTOL), step
    assert reference[CURVE_STEPS] < reference[1] - 0.5  # and it learns


# ---- the command line: resume after SIGKILL, two processes, bad input --------------------------
def command(workdir: Path, *args: str, steps: int = 8) -> list[str]:
    return [
        sys.executable, "-m", "experiments.run", "train", "--no-progress",
        f"--workdir={workdir}", f"--steps={steps}", "--save-every=3", "--eval-every=4",
        *SETS, *args,
    ]  # fmt: skip


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    proc = run(command(workdir))
    assert proc.returncode == 0, proc.stderr
    assert "final: step 8, train loss" in proc.stdout
    return losses(workdir)


def kill_then_resume(args: list[str], workdir: Path) -> None:
    """Run `args` (an 8-step run in `workdir`), SIGKILL it past the checkpoint of step 3, and
    run it again to the end."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, checkpoints = workdir / "metrics.jsonl", workdir / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # past the checkpoint of step 3
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert saved and max(saved) < 8, saved  # it really stopped mid-way
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr


def test_sigkill_then_rerun_resumes_with_the_same_losses(tmp_path, uninterrupted):
    kill_then_resume(command(tmp_path), tmp_path)
    assert losses(tmp_path) == uninterrupted


def test_ctrl_c_finishes_the_step_saves_it_and_the_run_resumes_exactly(tmp_path, uninterrupted):
    first = subprocess.Popen(command(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:  # past step 4 (saved: 3)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    assert first.poll() is None, first.stderr.read().decode()
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    (line,) = err.decode().strip().splitlines()
    assert first.returncode == 130 and line.startswith("error: interrupted: stopped after "), line
    saved = int(line.split("stopped after step ")[1].split()[0])
    checkpoints = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert 4 <= saved < 8 and checkpoints[-1] == saved and max(losses(tmp_path)) == saved
    resumed = run(command(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path) == uninterrupted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(workdir: Path, *args: str) -> list[str]:
    """The standard output of the two processes of one 8-step run over both, after each ends
    with 0."""
    coordinator = f"--coordinator=127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            command(workdir, *args, coordinator, "--num-processes=2", f"--process-id={i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    return [out for out, _ in outputs]


def test_a_lost_process_stops_the_other_and_one_process_resumes(tmp_path):
    """Two processes of 8 devices; process 1 killed after step 7: process 0 exits within 60 s
    with one line naming it and the last checkpoint; one process of 8 devices resumes from
    that checkpoint under an 8-device layout, and every step is in the metrics once."""
    steps = 12
    coordinator = f"--coordinator=127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            command(tmp_path, coordinator, "--num-processes=2", f"--process-id={i}", steps=steps),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and procs[0].poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.02)
    assert procs[0].poll() is None and procs[1].poll() is None, procs[0].stderr.read()
    procs[1].kill()
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    procs[1].communicate()
    assert time.monotonic() - killed < 60
    assert procs[0].returncode == watch.EXIT_LOST, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: process 1 of 2 is lost ("), line
    assert "the last good checkpoint (step 6)" in line and "--devices" in line, line

    resumed = run(command(tmp_path, "--strategy=dp2_ep4", "--devices=8", steps=steps))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "written under ep16 on 16 devices, under dp2_ep4 on 8" in resumed.stdout
    lines = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert lines == list(range(1, steps + 1))


def test_two_processes_of_8_devices_train_like_one_of_16(tmp_path, uninterrupted):
    outputs = two_processes(tmp_path)
    assert "final: step 8" in outputs[0] and "final:" not in outputs[1]  # process 0 reports
    for step, loss in losses(tmp_path).items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-5), step


def one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: ["--data", str(write(d / "bad.json.gz", b"not gzip"))], "bad.json.gz"),
        (lambda d: ["--data", str(write(d / "empty.json", b""))], "empty.json"),
        (lambda d: ["--set", "learning_rate=-1"], "learning_rate=-1.0"),
    ],
)  # more in tests/test_bad_input.py
def test_bad_input_is_one_line_before_compiling(tmp_path, make, needle):
    one_line_error(run(command(tmp_path / "work", *make(tmp_path))), needle)


def digest(root: Path) -> dict[str, str]:
    """Every file under `root` by its content (the lock file's holder aside)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_checkpoints_of_another_model_or_state_form_are_refused_and_kept(tmp_path):
    """Another architecture, or a state of another form (here its recorded digest changed, as
    ma_separation's checkpoints had before they were saved in the one-mesh form), is one line;
    nothing in the workdir changes."""
    first = run(command(tmp_path, "--strategy=one_device", steps=3))  # the quickest to compile
    assert first.returncode == 0, first.stderr
    meta = tmp_path / "checkpoints" / "3" / "meta" / "metadata"
    written = json.loads(meta.read_text())
    meta.write_text(json.dumps(written | {"state": "0" * 16}))
    saved = digest(tmp_path)
    one_line_error(run(command(tmp_path, "--strategy=ma_separation")), "another form")
    one_line_error(run(command(tmp_path, "--strategy=one_device", "--set=d_ff=256")), "d_ff")
    assert digest(tmp_path) == saved  # every file as it was


SAVED_AT_10 = ("ep16", "ma_separation")


@functools.cache
def saved_curve(tmp: Path, name: str) -> tuple[dict[int, float], Path]:
    """The 20-step run under `name`, checkpointed at step 10 too, and its workdir."""
    workdir = tmp / f"{name}_saved_at_10"
    return run_in_process(meshes.get(name), workdir, save_every=CURVE_STEPS // 2), workdir


@pytest.mark.parametrize(
    ("written", "resume"),
    [
        ("ep16", "tp8_pp2"),
        ("ep16", "dp2_ep4"),
        ("ep16", "ma_separation"),
        ("ma_separation", "ep16"),
    ],
)
def test_a_checkpoint_resumes_under_another_layout_and_device_count(
    written, resume, tmp_path, tmp_path_factory, caplog
):
    """A checkpoint of step 10 on 16 devices resumed under another layout (tp8_pp2, 16 devices;
    dp2_ep4, 8; ma_separation's two meshes and back): the arrays are read into the new layout,
    the data streams go on where they were, and steps 11 to 20 give the uninterrupted run's
    losses (float32 sums in another order)."""
    reference, saved = saved_curve(tmp_path_factory.getbasetemp(), written)
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / str(CURVE_STEPS))
    with caplog.at_level("WARNING"):
        curve = run_in_process(meshes.get(resume), tmp_path)
    layout = meshes.get(resume)
    assert (
        f"resuming step 10, written under {written} on 16 devices, under {resume} on "
        f"{layout.n_devices}" in caplog.text
    )
    assert sorted(curve) == list(range(1, CURVE_STEPS + 1))
    for step in range(CURVE_STEPS // 2 + 1, CURVE_STEPS + 1):
        assert curve[step] == pytest.approx(reference[step], rel=CURVE_RTOL), step
    assert curve[CURVE_STEPS] != curve[CURVE_STEPS // 2 + 1]  # it trained on


def test_optimizer_state_is_sharded_like_the_parameters():
    cfg = preset("tiny_moe").replace(**SMALL)
    trainer = make_trainer(cfg, meshes.get("ep16"), jax.devices()[:16], TrainConfig())
    params, opt_state = trainer.abstract_state
    batch = jax.ShapeDtypeStruct(
        (cfg.batch, cfg.seq_len + 1), "int32", sharding=trainer.batch_sharding
    )
    compiled = trainer.step.lower(params, opt_state, batch, 0).compile()
    param_shardings, opt_shardings = compiled.input_shardings[0][:2]  # as the program has them
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    specs = dict(zip(paths, (s.spec for s in jax.tree.leaves(param_shardings)), strict=True))
    moments = 0
    opt_paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(opt_state)]
    for path, sharding in zip(opt_paths, jax.tree.leaves(opt_shardings), strict=True):
        for start in range(len(path)):
            if tuple(path[start:]) in specs:
                assert sharding.spec == specs[tuple(path[start:])], path
                moments += 1
                break
    assert moments == 2 * len(specs)  # Adam's two moments of every parameter
    expert = [s for p, s in specs.items() if "w_in" in str(p) and "moe" in str(p)]
    assert expert and all("expert" in str(s) for s in expert)


@pytest.mark.parametrize("strategy", ["dp2_ep4", "fsdp4_tp2"])
def test_composed_layouts_on_8_devices_learn_checkpoint_and_resume(tmp_path, strategy):
    """On 8 devices: 8 steps learn; fsdp4_tp2 killed past the checkpoint of step 3, a rerun
    gives the same losses; dp2_ep4 in two processes of 4 devices gives those of one process of
    8."""
    args = [f"--strategy={strategy}", "--devices=8", "--set=learning_rate=3e-3"]
    whole = run(command(tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = losses(tmp_path / "whole")
    assert sorted(reference) == list(range(1, 9)) and reference[8] < reference[1]
    if strategy == "fsdp4_tp2":
        kill_then_resume(command(tmp_path / "killed", *args), tmp_path / "killed")
        assert losses(tmp_path / "killed") == reference
        return
    two_processes(tmp_path / "two", *args)
    for step, loss in losses(tmp_path / "two").items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


def test_a_checkpoint_resumes_with_another_batch_and_micro_batch_count(tmp_path, caplog):
    """The architecture decides what restores; batch and micro-batches are the workload's."""
    strategy = meshes.get("dp2_pp2")
    devices = jax.devices()[: strategy.n_devices]
    cfg = preset("tiny_moe").replace(**SMALL)
    tc = TrainConfig(learning_rate=CURVE_LR).scaled_to(4)

    def train_to(steps: int, cfg) -> None:
        opts = RunOptions(steps=steps, workdir=tmp_path, eval_every=2, save_every=2, progress=False)
        train(cfg, strategy, tc, opts, devices)

    train_to(2, cfg.replace(batch=16, micro_batches=4))
    with caplog.at_level("WARNING"):
        train_to(4, cfg.replace(batch=8, micro_batches=2))
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    notes = caplog.text
    assert "another workload" in notes and "batch: saved 16, now 8" in notes
    assert "micro_batches: saved 4, now 2" in notes and "data streams start afresh" in notes
    with pytest.raises(ConfigError, match="another model"):  # an architecture field still counts
        train_to(6, cfg.replace(batch=8, micro_batches=2, d_ff=256))

"""Faults during training end in one line and lose nothing saved: divergence (the kept checkpoint
is finite and a lower learning rate goes on from it), damaged checkpoints (fallback, the damaged
ones kept aside unchanged), a second run on one work directory, SIGTERM before the first step, a
full disk. (Ctrl-C mid-run: tests/test_train.py, beside the SIGKILL test it shares a run with.)"""

import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxmoe.train import checkpoints
from jaxmoe.train.lock import WorkdirLock
from tests.test_train import command, digest, losses, run

# the schedule does not follow --steps; one device is quickest to compile (the damaged checkpoints
# are restored into ep16's shardings over 16 devices)
EXPLICIT = ["--set=warmup_steps=0", "--set=decay_steps=100"]
ONE = [*EXPLICIT, "--strategy=one_device", "--devices=1"]


def steps_in(checkpoints: Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def one_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_divergence_keeps_a_finite_checkpoint_that_a_lower_learning_rate_resumes(tmp_path):
    good = run(command(tmp_path, *ONE, steps=3))  # checkpoint 3, finite
    assert good.returncode == 0, good.stderr[-2000:]
    kept = digest(tmp_path / "checkpoints" / "3")
    # save every step: the huge but finite state of step 4 is saved, and step 5's gradient is not
    # finite; that checkpoint would diverge again at once, so it is set aside (not deleted)
    bad = [*ONE, "--set=learning_rate=1e30", "--save-every=1"]
    line = one_line(run(command(tmp_path, *bad, steps=8)), 3, "diverged at step", "not applied")
    diverged_at = int(line.split("diverged at step ")[1].split()[0])
    assert diverged_at > 3
    saved = steps_in(tmp_path / "checkpoints")
    assert saved and max(saved) < diverged_at, saved
    assert f"the last good checkpoint (step {max(saved)})" in line
    assert digest(tmp_path / "checkpoints" / "3") == kept  # what was saved is unchanged
    set_aside = tmp_path / "checkpoints.diverged"
    assert [p.name for p in set_aside.iterdir()] == [str(diverged_at - 1)]
    logged = losses(tmp_path)
    assert max(logged) == diverged_at - 1 and all(math.isfinite(v) for v in logged.values())
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(max(saved)) / "state")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))

    resumed = run(command(tmp_path, *ONE, "--set=learning_rate=3e-5", steps=8))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stderr == ""
    (note,) = [line for line in resumed.stdout.splitlines() if line.startswith("note: ")]
    assert note.startswith(f"note: resuming step {max(saved)} with changed training fields")
    assert "learning_rate: saved 0.003, now 3e-05" in note  # the tiny presets' rate
    after = losses(tmp_path)
    assert sorted(after) == list(range(1, 9)) and all(math.isfinite(v) for v in after.values())


# the damage done to one checkpoint each: (what, how)
DAMAGE = {
    "a data file cut short": lambda c: [
        os.truncate(f, 10) for f in (c / "state" / "ocdbt.process_0" / "d").iterdir()
    ],
    "the manifest missing": lambda c: [
        (c / "state" / "manifest.ocdbt").unlink(),
        (c / "state" / "ocdbt.process_0" / "manifest.ocdbt").unlink(),
    ],
    "_METADATA missing": lambda c: (c / "state" / "_METADATA").unlink(),
    "the data position cut short": lambda c: os.truncate(c / "data" / "metadata", 100),
}


def test_damaged_checkpoints_fall_back_to_the_newest_good_one_and_stay_on_disk(tmp_path):
    n = len(DAMAGE) + 2
    args = [*EXPLICIT, f"--set=keep_checkpoints={n}", "--save-every=1"]
    first = run(command(tmp_path, *args, steps=n))
    assert first.returncode == 0, first.stderr[-2000:]
    reference = losses(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    assert steps_in(checkpoints) == list(range(1, n + 1))
    damaged = {}
    for step, damage in zip(range(n, 2, -1), DAMAGE.values(), strict=False):
        damage(checkpoints / str(step))
        damaged[step] = digest(checkpoints / str(step))
    good = digest(checkpoints / "2")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # as a run killed mid-write leaves it

    proc = run(command(tmp_path, *args, steps=n))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == len(DAMAGE) + 1, notes
    for line, step in zip(notes, damaged, strict=False):
        assert line.startswith(f"note: checkpoint {step} is damaged (") and "moved to" in line
    assert notes[-1].startswith("note: dropped an unreadable line of")
    aside = tmp_path / "checkpoints.damaged"
    for step, files in damaged.items():  # kept as they were, out of the way
        assert digest(aside / str(step)) == files
    assert digest(checkpoints / "2") == good
    assert losses(tmp_path) == reference  # resumed from step 2: the same steps again


def test_a_second_run_on_a_workdir_is_refused_and_changes_nothing(tmp_path):
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)  # what a run in progress has written
    (tmp_path / "checkpoints" / "2" / "state").write_bytes(os.urandom(64))
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 10.8}\n{"step": 2, "loss": 10.7}\n'
    )
    with WorkdirLock(tmp_path):  # as a run in progress holds it
        before = digest(tmp_path)
        proc = run(command(tmp_path, *ONE, steps=4))
        assert digest(tmp_path) == before
    one_line(proc, 2, "in use by another run", f"process {os.getpid()}")
    assert proc.stdout == ""


def test_sigterm_before_the_first_step_is_one_line(tmp_path):
    proc = subprocess.Popen(
        command(tmp_path, *ONE), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    (line,) = err.strip().splitlines()
    assert line.startswith("error: interrupted") and "run the same command" in line
    assert "final:" not in out


@pytest.fixture
def small_disk(tmp_path):
    """A 130 MiB file system: room for a checkpoint of the test model (80 MiB at most, about
    50 as written), not for three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=130M", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode:
        pytest.skip(f"cannot mount a small file system here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_disk):
    workdir = small_disk / "run"
    scaled = ["--strategy=one_device", "--devices=1", "--save-every=1"]  # schedule follows --steps
    proc = run(command(workdir, *scaled, steps=5))
    line = one_line(proc, 2, "No space left on device", "the last good checkpoint (step ")
    kept = int(line.split("(step ")[1].split(")")[0])
    assert steps_in(workdir / "checkpoints")[-1] == kept >= 1
    copy = small_disk.parent / "copy"  # the kept checkpoint resumes elsewhere
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("*orbax-checkpoint-tmp*"))
    resumed = run(command(copy, *scaled, steps=kept + 1))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (note,) = [line for line in resumed.stdout.splitlines() if line.startswith("note: ")]
    assert f"decay_steps: saved 5, now {kept + 1}" in note  # --steps rescaled the schedule
    assert max(losses(copy)) == kept + 1
    assert json.loads((copy / "metrics.jsonl").read_text().splitlines()[-1])["step"] == kept + 1


def test_abandoned_shard_reads_of_a_damaged_checkpoint_print_nothing(capsys, monkeypatch):
    """Orbax reads an array's shards concurrently; when one read fails, the others are dropped
    and would print their own failure when collected ("Exception ignored in ..."): the
    checkpoint is already reported damaged, so only those are silenced."""
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    checkpoints._drop_late_callbacks()

    class Pause:
        def __await__(self):
            yield

    async def _read_array_index_and_device_put():  # orbax's name; raises when dropped
        try:
            await Pause()
        finally:
            raise OSError("shard unreadable")

    async def something_else():
        try:
            await Pause()
        finally:
            raise OSError("shown")

    for make in (_read_array_index_and_device_put, something_else):
        coroutine = make()
        coroutine.send(None)  # suspended mid-read, then dropped
        del coroutine
        gc.collect()
    printed = capsys.readouterr().err
    assert "something_else" in printed and "_read_array_index" not in printed

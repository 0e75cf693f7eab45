"""Starting JAX's multi-controller runtime: a missing coordinator or peer, a mismatched process
count or a bad flag is one line on stderr (exit 2) within the --init-timeout, never a hang or a
C++ abort."""

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jaxmoe import runtime
from jaxmoe.config import ConfigError

SMALL = {"d_model": 64, "d_ff": 128, "n_heads": 16, "head_dim": 4, "seq_len": 32}
DEFAULT_TIMEOUT_S = 30  # experiments/run.py's --init-timeout


def command(workdir: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "experiments.run", "train", "--no-progress",
        f"--workdir={workdir}", "--steps=2", *(f"--set={k}={v}" for k, v in SMALL.items()), *args,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str]) -> tuple[subprocess.Popen, float]:
    popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return popen, time.monotonic()


def finish(started: tuple[subprocess.Popen, float], timeout: float = 120) -> tuple[str, float]:
    """stderr and wall seconds of a process that must exit 2."""
    popen, t0 = started
    _, err = popen.communicate(timeout=timeout)
    wall = time.monotonic() - t0
    assert popen.returncode == 2, (popen.returncode, err[-2000:])
    return err, wall


def one_line(stderr: str, *needles: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- the command line: nobody there, within the default or a given --init-timeout -------------
def test_no_coordinator_and_no_peer_are_one_line_within_the_default_timeout(tmp_path):
    nobody, alone = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    peer = start(command(tmp_path / "a", f"--coordinator={nobody}", "--num-processes=2",
                         "--process-id=1"))  # fmt: skip
    first = start(command(tmp_path / "b", f"--coordinator={alone}", "--num-processes=2",
                          "--process-id=0"))  # fmt: skip
    (peer_err, peer_wall), (first_err, first_wall) = finish(peer), finish(first)
    one_line(peer_err, f"no coordinator answered at {nobody} within {DEFAULT_TIMEOUT_S} s",
             "start process 0 first")  # fmt: skip
    one_line(first_err, f"1 of 2 processes joined within {DEFAULT_TIMEOUT_S} s",
             "--num-processes 2", "--init-timeout")  # fmt: skip
    assert DEFAULT_TIMEOUT_S <= peer_wall < 60 and DEFAULT_TIMEOUT_S <= first_wall < 60, (
        peer_wall,
        first_wall,
    )


def test_init_timeout_bounds_the_wait(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    args = [f"--coordinator={coordinator}", "--num-processes=2", "--process-id=1"]
    err, wall = finish(start(command(tmp_path, *args, "--init-timeout=5")))
    one_line(err, f"no coordinator answered at {coordinator} within 5 s")
    assert 5 <= wall < 20, wall


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--coordinator=nohostport"], "--coordinator 'nohostport' is not HOST:PORT"),
        (["--init-timeout=0"], "--init-timeout 0 must be a positive"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, flags, needle):
    err, _ = finish(start(command(tmp_path, *flags)))
    one_line(err, needle)


# ---- the library: validation and the meeting on process 0's port, in this process -------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"process_id": 2}, "--process-id 2 must be in 0..1"),
        ({"devices": 15}, "--devices 15 does not split over 2"),
        ({"timeout_s": -1.0}, "--init-timeout -1 must be a positive"),
        ({"timeout_s": float("nan")}, "--init-timeout nan must be a positive"),
        ({"coordinator": None}, "needs --coordinator HOST:PORT"),
        ({"coordinator": "host:65536"}, "port in 1..65535"),
        ({"coordinator": "host:0"}, "port in 1..65535"),
        ({"coordinator": ":1234"}, "is not HOST:PORT"),
    ],
)
def test_start_refuses_bad_arguments_before_anything_starts(kwargs, needle):
    args = {"devices": 16, "num_processes": 2, "process_id": 1, "coordinator": "h:1"}
    args |= {"timeout_s": 30.0, **kwargs}
    with pytest.raises(ConfigError) as err:
        runtime.start(**args)
    assert needle in str(err.value)


def test_parse_address():
    assert runtime.parse_address("10.0.0.1:1234") == ("10.0.0.1", 1234)
    assert runtime.parse_address("[::1]:65535") == ("::1", 65535)


def meet(port: int, n: int, joiners: list[tuple[int, int]], timeout_s: float = 10.0):
    """Process 0 (n processes) and peers (process id, their count) meeting on `port`, as
    threads: what each returned or raised, process 0's first."""
    coordinator = f"127.0.0.1:{port}"
    results: list[object] = [None] * (1 + len(joiners))

    def call(i, fn, *args):
        try:
            results[i] = fn(*args)
        except ConfigError as err:
            results[i] = err

    threads = [threading.Thread(target=call, args=(0, runtime._gather, port, n, coordinator,
                                                   timeout_s))]  # fmt: skip
    for i, (pid, count) in enumerate(joiners, 1):
        address = ("127.0.0.1", port)
        threads.append(threading.Thread(target=call, args=(i, runtime._join, address, pid, count,
                                                           coordinator, timeout_s)))  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s + 10)
    return results


def test_every_process_there_meets():
    """Each peer learns the port process 0 watches them on (`jaxmoe.watch`)."""
    first, *peers = meet(free_port(), 3, [(1, 3), (2, 3)])
    assert first is None and len(set(peers)) == 1 and isinstance(peers[0], int), peers


def test_a_mismatched_process_count_fails_both_sides_at_once():
    t0 = time.monotonic()
    first, peer = meet(free_port(), 2, [(1, 3)])
    assert time.monotonic() - t0 < 5
    assert isinstance(first, ConfigError) and "--num-processes 3, process 0 with 2" in str(first)
    assert isinstance(peer, ConfigError) and "process 0 at 127.0.0.1:" in str(peer)
    assert "--num-processes 3, process 0 with 2" in str(peer)


def test_a_duplicate_process_id_fails():
    first, *_ = meet(free_port(), 3, [(1, 3), (1, 3)], timeout_s=5.0)
    assert isinstance(first, ConfigError) and "two processes" in str(first), first


def test_a_port_held_by_another_program():
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen on port"):
            runtime._gather(port, 2, f"127.0.0.1:{port}", 1.0)

        def answer_nonsense():
            conn, _ = other.accept()
            with conn:
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer_nonsense, daemon=True).start()
        with pytest.raises(ConfigError, match="is not process 0 of this run"):
            runtime._join(("127.0.0.1", port), 1, 2, f"127.0.0.1:{port}", 5.0)


# the watch alone (no JAX): process 0 serves, the peer joins, one of them stops on an error
WATCHER = """
import sys, time
from jaxmoe import watch
if sys.argv[1] == "0":
    port, begin = watch.serve(2)
    print(port, flush=True)
    begin(30)
else:
    watch.join("127.0.0.1", int(sys.argv[2]), 1, 2, 30)
while not watch._conns:  # until the two are connected
    time.sleep(0.05)
time.sleep(0.5)
if sys.argv[1] == sys.argv[-1]:  # the one that fails
    print("error: the disk is full; free some space", file=sys.stderr)
    watch.leave(failed="error: the disk is full; free some space")
    sys.exit(2)
time.sleep(60)  # waiting in a collective that will never end
"""


@pytest.mark.parametrize("failing", [0, 1])
def test_a_process_stopping_on_its_own_error_stops_the_others_at_once(failing):
    """A process that fails with its error line tells the others, which stop within seconds
    with one line quoting it (exit 4), not when JAX's collective times out."""
    first = subprocess.Popen(
        [sys.executable, "-c", WATCHER, "0", str(failing)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    port = first.stdout.readline().strip()
    peer = subprocess.Popen(
        [sys.executable, "-c", WATCHER, "1", port, str(failing)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    t0 = time.monotonic()
    procs = [first, peer]
    errs = [p.communicate(timeout=30)[1] for p in procs]
    assert time.monotonic() - t0 < 15
    other = 1 - failing
    assert procs[failing].returncode == 2 and procs[other].returncode == 4, errs
    line = errs[other].strip().splitlines()[-1]
    assert line == (
        f"error: process {failing} of 2 is lost (it stopped on an error: the disk is full; "
        f"free some space); the run cannot go on without it"
    )

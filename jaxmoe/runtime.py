"""JAX's multi-controller runtime, started within a bounded time or refused with one line.

`jax.distributed.initialize` does not fail in Python when a peer is missing: past its
`initialization_timeout` the coordination client aborts the process in C++ (LOG(FATAL) in
client.h, rc 134, a stack trace on stderr), both on a process whose coordinator nobody answers
and on process 0 when a peer never registers. So the processes first meet on the coordinator's
port over plain TCP: process 0 listens there and waits for every peer's hello (its process id and
process count), peers retry connecting until it answers; a missing coordinator or peer, a
mismatched --num-processes or a duplicate --process-id is a `ConfigError` before any of JAX's
runtime starts. Only once everyone is there does process 0 close its socket, answer `go`, and
every process call `jax.distributed.initialize` on the same address.

Process 0's `go` names a port on which it then watches every peer and every peer watches it
(`jaxmoe.watch`): a process lost while the run goes on stops the others within seconds.

The platform (`jaxmoe.platform`) is set up around it: the CPU device count before the runtime
starts, the platform and its devices chosen once every process is there.
"""

import contextlib
import errno
import math
import os
import socket
import time
from collections.abc import Iterable
from typing import NoReturn

import jax

from jaxmoe import watch
from jaxmoe.config import ConfigError
from jaxmoe.platform import CPU_DEVICES, Platform, attach, check_count, configure

TASK_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")  # cluster launchers JAX detects
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
HELLO = "jaxmoe-join"  # a peer's first line: HELLO <process id> <process count>
RETRY_S = 0.2  # between a peer's connection attempts
REPLY_GRACE_S = 5.0  # a peer's wait for process 0's answer, beyond process 0's own deadline


def start(
    devices: int | None,
    num_processes: int,
    process_id: int,
    coordinator: str | None,
    timeout_s: float,
    platform: str | None = None,
) -> Platform:
    """This process's part of a run on `devices` in all (None: 16 virtual CPU devices, or every
    GPU or TPU device of every process) of `platform` (as `jaxmoe.platform.select`): on the CPU
    `devices // num_processes` virtual devices per process, on a GPU or TPU each process's own.
    With a coordinator (HOST:PORT, process 0's) or a cluster environment JAX detects, JAX's
    multi-controller runtime starts first; every process is there within `timeout_s` seconds or
    this raises `ConfigError`. Returns the run's devices (of every process)."""
    n = num_processes
    if n < 1:
        raise ConfigError(f"--num-processes {n}: must be at least 1")
    check_count(devices)
    if not 0 <= process_id < n:
        raise ConfigError(f"--process-id {process_id} must be in 0..{n - 1}")
    cpu_devices, rest = divmod(devices or CPU_DEVICES, n)
    if rest and platform in (None, "cpu"):  # on a GPU each process takes its own devices
        fix = f"run with --devices a multiple of {n}"
        if platform is None:
            fix += " (on the CPU), or --platform gpu for every GPU of each process"
        raise ConfigError(
            f"--devices {devices or CPU_DEVICES} does not split over {n} processes; {fix}"
        )
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"--init-timeout {timeout_s:g} must be a positive number of seconds")
    if n > 1 and not coordinator:
        raise ConfigError("--num-processes > 1 needs --coordinator HOST:PORT (process 0's)")
    address = parse_address(coordinator) if coordinator else None
    configure(platform, max(cpu_devices, 1))  # at least one, on a GPU too
    if address is not None:
        if process_id == 0:
            _gather(address[1], n, coordinator, timeout_s)
        else:
            watch_port = _join(address, process_id, n, coordinator, timeout_s)
            watch.join(address[0], watch_port, process_id, n, timeout_s)
        _initialize(timeout_s, coordinator, n, process_id)
        watch.leave_at_exit()
    elif os.environ.get(COORDINATOR_ENV) or any(
        int(os.environ.get(v) or 0) > 1 for v in TASK_COUNTS
    ):
        _initialize(timeout_s)  # JAX reads the address, count and id from the environment
    chosen = attach(platform, devices)
    everything = jax.device_count(chosen.name)
    if jax.process_count() > 1 and not chosen.virtual and len(chosen.devices) < everything:
        raise ConfigError(
            f"--devices {devices}: the {jax.process_count()} processes use every {chosen.name} "
            f"device of each ({everything} in all); leave --devices out"
        )
    return chosen


def parse_address(coordinator: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` (an IPv6 host in brackets), or `ConfigError`."""
    host, _, port = coordinator.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"--coordinator {coordinator!r} is not HOST:PORT with a port in 1..65535 "
            "(process 0's address, e.g. 10.0.0.1:1234)"
        )
    return host, int(port)


def _initialize(timeout_s: float, *address_count_id) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(*address_count_id, initialization_timeout=math.ceil(timeout_s))


def _gather(port: int, n: int, coordinator: str, timeout_s: float) -> None:
    """Process 0: wait on `port` until the n - 1 peers said hello, then answer each `go`."""
    deadline = time.monotonic() + timeout_s
    try:
        server = _listen(port)
    except OSError as err:
        raise ConfigError(
            f"process 0 cannot listen on port {port} of --coordinator {coordinator} "
            f"({err.strerror or err}); another run may hold it: pick a free port"
        ) from None
    peers: dict[int, socket.socket] = {}
    try:
        with server:
            while len(peers) < n - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = ", ".join(str(i) for i in range(1, n) if i not in peers)
                    _refuse(
                        peers.values(),
                        f"{len(peers) + 1} of {n} processes joined within {timeout_s:g} s "
                        f"(missing --process-id {missing}); start every process with "
                        f"--num-processes {n} and a distinct --process-id, or raise --init-timeout",
                    )
                server.settimeout(left)
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                peer = _hello(conn, min(left, REPLY_GRACE_S))
                if peer is None:  # not one of ours (a probe, another program): ignore it
                    conn.close()
                    continue
                pid, count = peer
                problem = _mismatch(pid, count, n, peers)
                if problem:
                    with conn:
                        _refuse([*peers.values(), conn], problem)
                peers[pid] = conn
        watch_port, start_watching = watch.serve(n)
        for conn in peers.values():
            conn.sendall(f"go {watch_port}\n".encode())
        for conn in peers.values():  # let the peers close first: no TIME_WAIT on the port here
            watch.read_line(conn, REPLY_GRACE_S)
        start_watching(timeout_s)
    finally:
        for conn in peers.values():
            conn.close()


def _mismatch(pid: int, count: int, n: int, peers: dict[int, socket.socket]) -> str | None:
    if count != n:
        return (
            f"process {pid} was started with --num-processes {count}, process 0 with {n}; "
            "start every process with the same --num-processes"
        )
    if pid in peers:
        return f"two processes were started with --process-id {pid}; give each a distinct one"
    if not 1 <= pid < n:
        return f"a process was started with --process-id {pid}, not in 1..{n - 1}"
    return None


def _refuse(conns: Iterable[socket.socket], message: str) -> NoReturn:
    """Tell every peer that waits why the run cannot start, and raise it here."""
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.sendall(f"fail {message}\n".encode())
    raise ConfigError(message)


def _hello(conn: socket.socket, timeout_s: float) -> tuple[int, int] | None:
    """(process id, process count) from a peer's hello line, or None if it is not one."""
    words = watch.read_line(conn, timeout_s).split()
    if len(words) != 3 or words[0] != HELLO or not words[1].isdigit() or not words[2].isdigit():
        return None
    return int(words[1]), int(words[2])


def _join(
    address: tuple[str, int], process_id: int, n: int, coordinator: str, timeout_s: float
) -> int:
    """A peer: connect to process 0 (retrying until the deadline), say hello, wait for `go`
    and the port process 0 watches its peers on (`jaxmoe.watch`)."""
    deadline = time.monotonic() + timeout_s
    last = "nothing tried"
    while (left := deadline - time.monotonic()) > 0:
        try:
            conn = socket.create_connection(address, timeout=left)
        except OSError as err:
            last = err.strerror or str(err)
            time.sleep(min(RETRY_S, max(deadline - time.monotonic(), 0)))
            continue
        with conn:
            # process 0 listened before this connection, so its own deadline is within timeout_s
            reply = _exchange(conn, f"{HELLO} {process_id} {n}\n", timeout_s + REPLY_GRACE_S)
        words = reply.split()
        if len(words) == 2 and words[0] == "go" and words[1].isdigit():
            return int(words[1])
        if reply.startswith("fail "):
            raise ConfigError(f"process 0 at {coordinator} gave up: {reply.removeprefix('fail ')}")
        raise ConfigError(
            f"what answers at {coordinator} is not process 0 of this run "
            f"({'no answer' if not reply else 'answered ' + repr(reply[:40])}); "
            "fix --coordinator or start process 0 there"
        )
    raise ConfigError(
        f"no coordinator answered at {coordinator} within {timeout_s:g} s ({last}); "
        "start process 0 first (it listens there) or fix --coordinator"
    )


def _exchange(conn: socket.socket, line: str, timeout_s: float) -> str:
    try:
        conn.sendall(line.encode())
    except OSError:
        return ""
    return watch.read_line(conn, timeout_s)


def _listen(port: int) -> socket.socket:
    """A socket on every address at `port`, as JAX's coordination service binds ([::]:port)."""
    if socket.has_dualstack_ipv6():
        try:
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        except OSError as err:
            if err.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):  # no IPv6 here
                raise
    return socket.create_server(("", port))


__all__ = ["COORDINATOR_ENV", "TASK_COUNTS", "parse_address", "start"]

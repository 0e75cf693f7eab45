"""The processes of a run watch each other, so a lost one stops the rest within a bounded time.

When a process of a multi-process run dies (SIGKILL, a crash, the OOM killer, a lost node), the
others wait in their next collective until JAX's coordination service gives up, then abort in
C++ with a stack trace. Here every peer keeps a TCP connection to process 0, and each side sends
a beat every `BEAT_S` seconds: a connection that closes without a goodbye (the kernel closes a
killed process's sockets at once) or stays silent for `SILENT_S` seconds is a lost process.
Process 0 tells the other peers, and every survivor prints one line naming the lost process and
what to do (`on_loss` sets it: the training loop names the last checkpoint), then exits with
`EXIT_LOST`. A process that ends normally says goodbye first (`leave`, at exit); one that
stops on an error of its own says so (`leave(failed=...)`), and the others stop with its line.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable

BEAT_S = 2.0  # between beats
SILENT_S = 300.0  # silence after which a process counts as lost (a long compile holds the GIL)
EXIT_LOST = 4
_WATCH = "jaxmoe-watch"  # a peer's first line: _WATCH <process id>
MAX_LINE = 512  # the longest line read from a socket

_lock = threading.Lock()
_conns: dict[int, socket.socket] = {}  # process id -> connection (process 0: every peer's)
_advice: list[Callable[[], str]] = [lambda: "the run cannot go on without it"]
_lost = threading.Event()  # set once a loss is found
_left = threading.Event()  # set once this process said goodbye: it watches no more


def on_loss(advice: Callable[[], str]) -> None:
    """What a survivor says after naming the lost process (called when it happens)."""
    _advice[0] = advice


def hold_if_lost(wait_s: float) -> None:
    """Where the main thread failed (a collective whose peer died raises at once), wait up to
    `wait_s` seconds for a lost process to be found; if one is, block: the watch ends the
    process with its one line, not a traceback."""
    deadline = time.monotonic() + wait_s
    while _conns and time.monotonic() < deadline:
        if _lost.is_set():
            threading.Event().wait()
        time.sleep(0.05)


def serve(n: int) -> tuple[int, Callable[[float], None]]:
    """Process 0: a port for the n - 1 peers' watch connections, and the function that starts
    waiting for them (within a deadline) and watching them, in the background."""
    listener = socket.create_server(("", 0))

    def start(timeout_s: float) -> None:
        def accept() -> None:
            deadline = time.monotonic() + timeout_s
            with listener:
                while len(_conns) < n - 1 and (left := deadline - time.monotonic()) > 0:
                    listener.settimeout(left)
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        break
                    words = read_line(conn, BEAT_S * 5).split()
                    if len(words) == 2 and words[0] == _WATCH and words[1].isdigit():
                        with _lock:
                            _conns[int(words[1])] = conn
                    else:
                        conn.close()
            _watch(n)

        _begin(accept)

    return listener.getsockname()[1], start


def join(host: str, port: int, process_id: int, n: int, timeout_s: float) -> None:
    """A peer: connect to process 0's watch port and watch it, in the background."""
    conn = socket.create_connection((host, port), timeout=timeout_s)
    conn.sendall(f"{_WATCH} {process_id}\n".encode())
    with _lock:
        _conns[0] = conn
    _begin(lambda: _watch(n))


def leave(failed: str | None = None) -> None:
    """Say goodbye to every process watched (this one ends as it should), or, with `failed`
    (this process's error line), that it stopped on an error: the others then stop at once,
    not when a collective of theirs times out."""
    _left.set()
    with _lock:
        conns = dict(_conns)
        _conns.clear()
    said = "bye" if failed is None else "fail " + " ".join(failed.removeprefix("error: ").split())
    said = said[: MAX_LINE - 1]
    for conn in conns.values():
        with contextlib.suppress(OSError):
            conn.sendall(f"{said}\n".encode())
            conn.close()


def _begin(target: Callable[[], None]) -> None:
    threading.Thread(target=target, name="jaxmoe-watch", daemon=True).start()


def leave_at_exit() -> None:
    """Say goodbye when the interpreter exits; registered after JAX's runtime starts, this
    runs before its shutdown barrier (atexit runs last first), so nobody is watched there."""
    atexit.register(leave)


def read_line(conn: socket.socket, timeout_s: float) -> str:
    """One line (without its newline) within `timeout_s`; what came before EOF, an error or the
    time limit otherwise."""
    data = b""
    deadline = time.monotonic() + timeout_s
    try:
        while b"\n" not in data and len(data) < MAX_LINE:
            conn.settimeout(max(deadline - time.monotonic(), 1e-3))
            chunk = conn.recv(MAX_LINE)
            if not chunk:
                break
            data += chunk
    except OSError:  # includes the time limit
        pass
    return data.partition(b"\n")[0].decode(errors="replace").strip()


def _watch(n: int) -> None:
    """Beat to every connection and read theirs until each said goodbye; a loss ends the
    process."""
    heard = {pid: time.monotonic() for pid in _conns}
    pending = {pid: b"" for pid in _conns}
    sent = 0.0
    while not _left.is_set():
        with _lock:
            conns = dict(_conns)
        if not conns:
            return
        now = time.monotonic()
        if now - sent >= BEAT_S:
            sent = now
            for conn in conns.values():
                with contextlib.suppress(OSError):
                    conn.settimeout(BEAT_S)
                    conn.sendall(b"beat\n")
        try:
            ready, _, _ = select.select(list(conns.values()), [], [], BEAT_S)
        except (OSError, ValueError):  # a connection this process closed as it said goodbye
            if _left.is_set():
                return
            raise
        for pid, conn in conns.items():
            if conn not in ready:
                if time.monotonic() - heard[pid] > SILENT_S:
                    _lose(pid, n, f"silent for {SILENT_S:g} s")
                continue
            try:
                chunk = conn.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                _lose(pid, n, "its connection closed without a goodbye")
            heard[pid] = time.monotonic()
            pending[pid] += chunk
            *lines, pending[pid] = pending[pid].split(b"\n")
            for line in lines:
                words = line.decode(errors="replace").split(maxsplit=2)
                if words and words[0] == "bye":
                    with _lock:
                        _conns.pop(pid, None)
                    conn.close()
                    break
                if words and words[0] == "fail":
                    _lose(pid, n, f"it stopped on an error: {line.decode(errors='replace')[5:]}")
                if len(words) == 3 and words[0] == "lost" and words[1].isdigit():
                    _lose(int(words[1]), n, words[2])


def _lose(pid: int, n: int, why: str) -> None:
    """Tell the other peers (process 0), say it in one line, and end this process (unless it
    said goodbye itself: then the connections closed are its own)."""
    if _left.is_set():
        sys.exit()  # ends the watch thread only
    with _lock:
        others = {p: c for p, c in _conns.items() if p != pid}
    for conn in others.values():
        with contextlib.suppress(OSError):
            conn.sendall(f"lost {pid} {why}\n".encode())
    _lost.set()
    message = f"process {pid} of {n} is lost ({why}); {_advice[0]()}"
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_LOST)

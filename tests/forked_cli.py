"""Many command lines, quickly: each runs `experiments.run.main` in a process of its own, forked
from a server that imported the CLI once (multiprocessing's forkserver), its stdout and stderr
captured at the file descriptors and its exit code kept, as `python -m experiments.run` gives
them (an uncaught exception prints its traceback there). Importing JAX, Flax and the rest takes
about 3 s of the 3.5 s a subprocess of a refused command costs."""

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["experiments.run"])


def _main(argv: list[str], out: str, err: str) -> None:
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    from experiments.run import main

    sys.exit(main(argv))


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "out"), Path(tmp, "err")
        process = _CONTEXT.Process(target=_main, args=(list(args), str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise TimeoutError(f"{args} ran past {timeout} s")
        return subprocess.CompletedProcess(args, process.exitcode, out.read_text(), err.read_text())

"""Every test runs on XLA's CPU backend with 32 virtual devices (a layout runs on the first of
them it needs) and jaxmoe's XLA flags (`platform.configure`), set before JAX starts; so does
every command a test starts (JAX_PLATFORMS and XLA_FLAGS are inherited), whatever accelerator
is here.

The test session shares one persistent compilation cache (a fresh directory per run, inherited
by the commands the tests start and by both pytest-xdist workers): a program compiled once, by
any of them, is not compiled again. Executables read from it give the same HLO text, memory and
cost analyses, so nothing a test asserts depends on whether it was a hit."""

import os
import shutil
import tempfile
from pathlib import Path

run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
CACHE = Path(tempfile.gettempdir()) / f"jaxmoe-tests-{run_id}"
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(CACHE)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  (after the environment it reads)

from jaxmoe import platform  # noqa: E402

platform.configure("cpu", 32)  # and XLA's CPU flags, as every command sets them
jax.devices()  # start JAX now: a command run in-process later cannot change the count


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # the controller, once every worker has finished
        shutil.rmtree(CACHE, ignore_errors=True)

"""Every test runs on XLA's CPU backend with 32 virtual devices (a layout runs on the first of
them it needs), set before JAX starts; so does every command a test starts (JAX_PLATFORMS is
inherited), whatever accelerator is here."""

import os

import jax

os.environ["JAX_PLATFORMS"] = "cpu"
jax.config.update("jax_num_cpu_devices", 32)
jax.config.update("jax_platforms", "cpu")
jax.devices()  # start JAX now: a command run in-process later cannot change the count

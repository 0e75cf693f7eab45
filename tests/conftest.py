"""Every test runs on XLA's CPU backend with 16 virtual devices, set before JAX starts; so does
every command a test starts (JAX_PLATFORMS is inherited), whatever accelerator is here."""

import os

import jax

os.environ["JAX_PLATFORMS"] = "cpu"
jax.config.update("jax_num_cpu_devices", 16)
jax.config.update("jax_platforms", "cpu")

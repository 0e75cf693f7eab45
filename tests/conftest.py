"""Every test runs on XLA's CPU backend with 16 virtual devices, set before JAX starts."""

import jax

jax.config.update("jax_num_cpu_devices", 16)
jax.config.update("jax_platforms", "cpu")

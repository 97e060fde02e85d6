"""Test-wide setup: float32-exact CPU numerics and 8 virtual CPU devices for sharding tests."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu" if not os.environ.get("KAT_TEST_GPU") else "")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

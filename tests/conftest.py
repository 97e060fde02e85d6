"""Test-wide setup: float32-exact CPU numerics and 8 virtual CPU devices for sharding tests."""

import atexit
import os
import shutil
import tempfile

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu" if not os.environ.get("KAT_TEST_GPU") else "")
# One compilation cache per test run: a fresh, empty directory, removed at exit, shared by the
# xdist workers and by the subprocesses tests start (they inherit the variable). A program
# built again (a resumed stage, the same train step in another test) is loaded instead of
# compiled again; XLA compiles deterministically, so it is the executable a compile would give.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kat_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

"""Test configuration shared by tests/ and the doctests in jaxaccum/.

Eight simulated CPU devices must be requested before jax is first imported, so
this file sets XLA_FLAGS at import time; strict dtype promotion makes any
implicit mixing of dtypes in jaxaccum an error rather than a silent upcast.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

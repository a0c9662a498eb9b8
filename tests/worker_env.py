"""XLA flags for the suite's worker processes (import before JAX; imports nothing heavy)."""

import os
import re


def use_host_devices(count: int) -> None:
    """Gives this process ``count`` CPU devices and keeps every other XLA flag it inherited
    (the suite's compile settings, or XLA's defaults when the suite runs without them)."""
    inherited = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    os.environ["XLA_FLAGS"] = f"{inherited} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

"""Emulate 8 CPU devices before jax is imported anywhere in the test session."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

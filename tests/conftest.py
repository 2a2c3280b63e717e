"""Emulate 8 CPU devices before jax is imported anywhere in the test session.

A device count already in XLA_FLAGS wins: ``--xla_force_host_platform_device_count=1`` runs the
suite with as many devices as one GPU has (what ``pytest -m gpu`` sees on a single-GPU machine).
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

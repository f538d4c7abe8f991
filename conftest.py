"""Docstring examples run as tests (`--doctest-modules` over maskopt/): each in a fresh working folder."""

import importlib.util

import pytest


@pytest.fixture(autouse=True)
def _doctest_folder(request, tmp_path, monkeypatch):
    """A doctest writes its files (masks.json, an export) where a user would: the working folder, here a fresh one."""
    if isinstance(request.node, pytest.DoctestItem):
        if request.node.name.startswith("maskopt.export.trt") and importlib.util.find_spec("tensorrt") is None:
            pytest.skip("TensorRT is not installed (its libraries come from NVIDIA's index)")
        monkeypatch.chdir(tmp_path)


def pytest_sessionfinish(session, exitstatus):
    """A test that fails inside a search can leave nevergrad's recast (scipy) optimizer thread waiting for a
    tell; it is not a daemon thread, so it would keep pytest from exiting. Stop any that are left."""
    import threading

    for thread in threading.enumerate():
        if type(thread).__name__ == "_MessagingThread":
            thread.stop()

"""Tiny pipelines, mask files and exports shared by the export/triton/generate tests, each made once per run.

Exports take seconds each, so they are cached per process (functools.cache) in one temporary folder
rather than redone per test module.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from maskopt import Buckets, MaskSet, find_units
from maskopt.cli import main
from maskopt.models import load_unet
from tiny import tiny_pipeline

K = 3  # buckets: [0, 332], [333, 666], [667, 999]


@functools.cache
def workspace() -> Path:
    path = Path(tempfile.mkdtemp(prefix="maskopt-export-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _kind(xl: bool | str) -> str:
    """'sd', 'xl' or 'sd21'; a bool means SDXL or not, as most tests ask."""
    return xl if isinstance(xl, str) else ("xl" if xl else "sd")


def pipeline(xl: bool | str = False) -> Path:
    return _pipeline(_kind(xl))  # one cache key whether called as pipeline(), pipeline(False) or pipeline("sd")


def masks(xl: bool | str = False) -> Path:
    return _masks(_kind(xl))


def exported(xl: bool | str = False, drop: bool = True) -> Path:
    """`maskopt export --onnx --triton [--drop]` of the tiny pipeline's masks."""
    return _exported(_kind(xl), bool(drop))


@functools.cache
def _pipeline(kind: str) -> Path:
    return tiny_pipeline(workspace() / f"pipe_{kind}", xl=kind == "xl", sd21=kind == "sd21")


@functools.cache
def _masks(kind: str) -> Path:
    """3 buckets over the paper units and every residual branch: each bucket removes a different third
    of the units and scales the rest, so the three variants differ and --drop has work to do."""
    unet = load_unet(str(pipeline(kind)))
    units = find_units(unet, ["paper", "branches"])
    values = np.random.default_rng(0).uniform(0.5, 1.5, (K, len(units)))
    for k in range(K):
        values[k, k::3] = 0.0
    path = workspace() / f"masks_{kind}.json"
    MaskSet.ones(unet, units, Buckets.uniform(K)).with_values(values, reward="test").save(path)
    return path


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@functools.cache
def _exported(kind: str, drop: bool) -> Path:
    out = workspace() / f"export_{kind}{'_drop' if drop else ''}"
    r = cli("export", "--masks", masks(kind), "--model", pipeline(kind), "--out", out, "--onnx", "--triton",
            *(["--drop"] if drop else []))
    assert r.exit_code == 0, r.output
    return out


def copy_of(folder: Path, name: str) -> Path:
    """A private copy of a cached export, for tests that tamper with it."""
    dst = workspace() / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(folder, dst)
    return dst

"""The search space: nevergrad parametrizations built from the mask contract, in one place.

    >>> param = space("gates", n_buckets=4, n_units=40)      # ng.p.Array in [lo, hi], starts at 1
    >>> values = decode(param.value, 4, 40)                  # (4, 40) numpy array for MaskSet.with_values
    >>> values.shape, float(values.min()), float(values.max())
    ((4, 40), 1.0, 1.0)
    >>> child = param.spawn_child(new_value=encode(values, "gates"))   # back again (journal replay, suggestions)

`binary` and `groups` are 0/1 per (bucket, unit) (`groups` on channel-group units); `gates` are
continuous scales in a bounded range around 1. Every parametrization starts at all ones (the baseline).

The objective is exact: the same seeds serve every candidate, so evaluating a candidate twice gives the
same loss. nevergrad's discrete (1+1) family assumes noise instead and distrusts a point told once (a
variance prior of 1e6), so a point told twice would beat every better point told once. `tell` therefore
tells each result of a discrete space twice, and the search never evaluates a candidate twice.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import nevergrad as ng
import numpy as np

from .errors import MaskoptError

# scipy's COBYLA (NGOpt's pick for bounded gates) warns on every start that nevergrad's settings are off
# (rhoend, or a budget under n + 2 that it then raises itself); nothing a user can act on.
warnings.filterwarnings("ignore", message="COBYLA: Invalid (RHOEND|MAXFUN)", category=UserWarning)

SPACES = ("binary", "gates", "groups")
# measured with `python benchmarks/optimizers.py --space S` on the embedded default (docs/benchmarks.md). For
# groups, DiscreteLenglerOnePlusOne wins at an equal budget but ties at equal time, and its large early
# mutations replay almost nothing from the trajectory cache; DiscreteOnePlusOne flips a few values at a time
DEFAULT_OPTIMIZER = {"binary": "DiscreteOnePlusOne", "groups": "DiscreteOnePlusOne", "gates": "NGOpt"}


def default_optimizer(kind: str) -> str:
    _check_kind(kind)
    return DEFAULT_OPTIMIZER[kind]


def check(kind: str, gate_range: tuple[float, float], name: str, workers: int) -> None:
    """Every refusal of a space and its optimizer, with nothing built: a bad name fails in a second."""
    _check_kind(kind)
    if kind == "gates":
        _check_range(gate_range)
    check_optimizer(name, workers)


def _check_kind(kind: str) -> None:
    if kind not in SPACES:
        raise MaskoptError(f"unknown space {kind!r}; valid: {', '.join(SPACES)}")


def _check_range(gate_range: tuple[float, float]) -> None:
    lo, hi = gate_range
    if not 0.0 <= lo < 1.0 < hi <= 2.0:
        raise MaskoptError(f"gate range {lo}:{hi} must hold 1 and lie within [0, 2]")


def check_optimizer(name: str, workers: int) -> None:
    """A nevergrad registry name, able to ask `workers` candidates at once."""
    if name not in ng.optimizers.registry:
        names = sorted(ng.optimizers.registry)
        # nevergrad registers hundreds of names: list the closest, spelled as it spells them
        close = [n for n in names if n.lower() == name.lower()] or difflib.get_close_matches(name, names, n=6, cutoff=0.6)
        raise MaskoptError(
            f"unknown optimizer {name!r}; valid: any of nevergrad's {len(names)} registry names, "
            + (f"closest: {', '.join(close)}" if close else "e.g. NGOpt, CMA, OnePlusOne, DiscreteOnePlusOne, TwoPointsDE")
        )
    if workers > 1 and getattr(ng.optimizers.registry[name], "no_parallelization", False):
        raise MaskoptError(f"optimizer {name!r} evaluates one candidate at a time: use --workers 1, or an optimizer "
                           "that asks several (e.g. NGOpt, OnePlusOne, DiscreteOnePlusOne, TwoPointsDE)")


def space(kind: str, n_buckets: int, n_units: int, gate_range: tuple[float, float] = (0.75, 1.25), seed: int = 0) -> ng.p.Parameter:
    _check_kind(kind)
    n = n_buckets * n_units
    if kind == "gates":
        _check_range(gate_range)
        lo, hi = gate_range
        param = ng.p.Array(init=np.ones(n), lower=lo, upper=hi)
    else:
        # deterministic: the value is the likeliest choice. The default (False) draws every value at random
        # from the softmax of its weights, so each candidate removed about a third of the units at random.
        param = ng.p.Choice([0.0, 1.0], repetitions=n, deterministic=True)
        param.value = encode(np.ones(n), kind)
    param.random_state = np.random.RandomState(seed)
    return param


def decode(value: Any, n_buckets: int, n_units: int) -> np.ndarray:
    return np.asarray(value, dtype=np.float64).reshape(n_buckets, n_units)


def encode(values: np.ndarray, kind: str) -> Any:
    flat = np.asarray(values, dtype=np.float64).ravel()
    return flat if kind == "gates" else tuple(float(v) for v in flat)


def optimizer(name: str | None, param: ng.p.Parameter, kind: str, budget: int, workers: int) -> Any:
    """A nevergrad optimizer by registry name (default per space), seeded with the all-ones baseline."""
    name = name or default_optimizer(kind)
    check_optimizer(name, workers)
    return ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=workers)


def tell(opt: Any, cand: ng.p.Parameter, loss: float, kind: str) -> None:
    """Tell a result; twice for the discrete spaces, so that it counts as exact (see the module docstring).

    Only nevergrad's own optimizers get the second tell; the bucket sweep tells its stage optimizers itself.
    """
    opt.tell(cand, loss)
    if kind != "gates" and isinstance(opt, ng.optimizers.base.Optimizer):
        try:
            opt.tell(cand, loss)
        except ng.errors.TellNotAskedNotSupportedError:  # optimizers that cannot take it (scipy's) keep one
            pass


def close(opt: Any) -> None:
    """Stop the worker threads of nevergrad's recast (scipy) optimizers, also those inside NGOpt's portfolio.

    They are not daemon threads and their owners sit in reference cycles, so without this a finished
    search could keep the process alive, blocked at exit.
    """
    seen: set[int] = set()
    stack = [opt]
    while stack:
        o = stack.pop()
        if id(o) in seen or not hasattr(o, "__dict__"):
            continue
        seen.add(id(o))
        thread = o.__dict__.get("_messaging_thread")
        if thread is not None:
            thread.stop()
        for v in o.__dict__.values():
            items = v if isinstance(v, (list, tuple)) else v.values() if isinstance(v, dict) else [v]
            stack.extend(x for x in items if isinstance(x, ng.optimizers.base.Optimizer))

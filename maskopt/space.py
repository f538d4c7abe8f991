"""The search space: nevergrad parametrizations built from the mask contract, in one place.

    >>> param = space("gates", n_buckets=4, n_units=40)      # ng.p.Array in [lo, hi], starts at 1
    >>> values = decode(param.value, 4, 40)                  # (4, 40) numpy array for MaskSet.with_values
    >>> values.shape, float(values.min()), float(values.max())
    ((4, 40), 1.0, 1.0)
    >>> child = param.spawn_child(new_value=encode(values, "gates"))   # back again (journal replay, suggestions)

`binary` and `groups` are 0/1 per (bucket, unit) (`groups` on channel-group units); `gates` are
continuous scales in a bounded range around 1. Every parametrization starts at all ones (the baseline).

Backbone units (FreeU's b, the `freeu` preset) are columns of their own (`backbone=` their indices): in
`gates` they range over BACKBONE_RANGE; in the discrete spaces they choose from BACKBONE_GRID, which holds
FreeU's backbone settings, so a candidate can be FreeU's best, a FreeU scheduled over timesteps, or that
and masks together:

    >>> param = space("groups", n_buckets=2, n_units=3, backbone=[0])   # unit 0 is a backbone unit
    >>> param.value = encode([[1.3, 0, 1], [1.6, 1, 0]], "groups", backbone=[0])
    >>> decode(param.value, 2, 3, backbone=[0]).tolist()
    [[1.3, 0.0, 1.0], [1.6, 1.0, 0.0]]

The objective is exact: the same seeds serve every candidate, so evaluating a candidate twice gives the
same loss. nevergrad's discrete (1+1) family assumes noise instead and distrusts a point told once (a
variance prior of 1e6), so a point told twice would beat every better point told once. `tell` therefore
tells each result of a discrete space twice, and the search never evaluates a candidate twice.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any, Sequence

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


# FreeU's b factors: its documented settings lie in 1.1..1.6 (freeu.py); a little room on both sides
BACKBONE_RANGE = (0.9, 1.8)
BACKBONE_GRID = (0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8)


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


def space(kind: str, n_buckets: int, n_units: int, gate_range: tuple[float, float] = (0.75, 1.25), seed: int = 0,
          backbone: Sequence[int] = ()) -> ng.p.Parameter:
    _check_kind(kind)
    n = n_buckets * n_units
    is_bb = _backbone_mask(n_buckets, n_units, backbone)
    if kind == "gates":
        _check_range(gate_range)
        lower, upper = _gate_bounds(is_bb, gate_range)
        param = ng.p.Array(init=np.ones(n), lower=lower, upper=upper)
    elif is_bb.all():  # FreeU's factors alone
        param = ng.p.Choice(list(BACKBONE_GRID), repetitions=n, deterministic=True)
        param.value = encode(np.ones((n_buckets, n_units)), kind, backbone)
    elif not is_bb.any():
        # deterministic: the value is the likeliest choice. The default (False) draws every value at random
        # from the softmax of its weights, so each candidate removed about a third of the units at random.
        param = ng.p.Choice([0.0, 1.0], repetitions=n, deterministic=True)
        param.value = encode(np.ones(n), kind)
    else:  # the mask values, then the backbone values, each bucket-major
        param = ng.p.Tuple(ng.p.Choice([0.0, 1.0], repetitions=int((~is_bb).sum()), deterministic=True),
                           ng.p.Choice(list(BACKBONE_GRID), repetitions=int(is_bb.sum()), deterministic=True))
        param.value = encode(np.ones((n_buckets, n_units)), kind, backbone)
    param.random_state = np.random.RandomState(seed)
    return param


def _gate_bounds(is_bb: np.ndarray, gate_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The gates space's lower and upper bound of each value: BACKBONE_RANGE for backbone units, else gate_range."""
    return (np.where(is_bb, BACKBONE_RANGE[0], gate_range[0]), np.where(is_bb, BACKBONE_RANGE[1], gate_range[1]))


def _backbone_mask(n_buckets: int, n_units: int, backbone: Sequence[int]) -> np.ndarray:
    """(n,) bool, bucket-major: which flat values are backbone units'."""
    cols = np.zeros(n_units, dtype=bool)
    cols[list(backbone)] = True
    return np.tile(cols, n_buckets)


def decode(value: Any, n_buckets: int, n_units: int, backbone: Sequence[int] = ()) -> np.ndarray:
    """A candidate's value as the (n_buckets, n_units) array a MaskSet holds."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple):  # (masks, backbone) choices
        is_bb = _backbone_mask(n_buckets, n_units, backbone)
        flat = np.empty(n_buckets * n_units)
        flat[~is_bb], flat[is_bb] = value
        return flat.reshape(n_buckets, n_units)
    return np.asarray(value, dtype=np.float64).reshape(n_buckets, n_units)


def encode(values: Any, kind: str, backbone: Sequence[int] = ()) -> Any:
    """The value `space(kind, ..., backbone=backbone)` holds for a (n_buckets, n_units) array; refuses a value
    the space cannot hold, naming it."""
    values = np.asarray(values, dtype=np.float64)
    flat = values.ravel()
    if kind == "gates":
        return flat
    is_bb = _backbone_mask(*values.reshape(-1, values.shape[-1]).shape, backbone)
    masks, bb = flat[~is_bb], flat[is_bb]
    if not np.isin(masks, (0.0, 1.0)).all():
        raise MaskoptError(f"value {masks[~np.isin(masks, (0.0, 1.0))][0]:g} is not 0 or 1, which a {kind} space holds")
    if not is_bb.any():
        return tuple(float(v) for v in flat)
    snapped = [min(BACKBONE_GRID, key=lambda g: abs(g - v)) for v in bb]
    if any(abs(g - v) > 1e-9 for g, v in zip(snapped, bb)):
        raise MaskoptError(f"backbone value {next(v for g, v in zip(snapped, bb) if abs(g - v) > 1e-9):g} is not one of "
                           f"the {kind} space's {', '.join(f'{g:g}' for g in BACKBONE_GRID)}")
    return tuple(snapped) if is_bb.all() else (tuple(float(v) for v in masks), tuple(snapped))


def check_point(values: Any, kind: str, gate_range: tuple[float, float], backbone: Sequence[int], what: str) -> None:
    """`values` ((buckets, units)) is a point of the space; MaskoptError naming `what` and the value otherwise."""
    values = np.asarray(values, dtype=np.float64)
    if kind != "gates":
        try:
            encode(values, kind, backbone)
        except MaskoptError as e:
            raise MaskoptError(f"{what}: {e}") from None
        return
    lo, hi = (b.reshape(values.shape) for b in _gate_bounds(_backbone_mask(*values.shape, backbone), gate_range))
    bad = (values < lo) | (values > hi)
    if bad.any():
        k, j = map(int, np.argwhere(bad)[0])
        raise MaskoptError(f"{what}: value {values[k, j]:g} (bucket {k}, unit {j}) is outside the gates space's "
                           f"{lo[k, j]:g}..{hi[k, j]:g}")


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

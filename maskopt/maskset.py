"""The mask file: the one contract between search and export.

A MaskSet holds one row of values per timestep bucket and one value per unit (1 keeps, 0 removes,
values in between or up to 2 scale), plus what it was made for (the U-Net's source and fingerprint,
and the sampler it was searched with) and what made it (provenance). On disk it is JSON,
`"format": "maskopt.masks/2"`, documented in docs/mask-format.md; files of format 1 are still read.
`MaskSet.load(path, unet=unet)` refuses a file that does not fit the U-Net.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from . import __version__
from .buckets import Buckets
from .errors import MaskoptError
from .sampler import Sampler
from .units import Unit

logger = logging.getLogger(__name__)

FORMAT = "maskopt.masks/2"
FORMAT_1 = "maskopt.masks/1"  # no sampler section: read, its sampler taken from the provenance where it is there
MAX_VALUE = 2.0


def fingerprint(unet: nn.Module) -> str:
    """sha256 of the sorted `name:shape` lines of the state dict: same architecture, same fingerprint."""
    lines = sorted(f"{n}:{'x'.join(map(str, t.shape))}" for n, t in unet.state_dict().items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def weights_sample(unet: nn.Module, tensors: int = 8, per_tensor: int = 8) -> tuple[float, ...]:
    """A few weight values, evenly spaced through the U-Net's largest tensors: they tell two checkpoints of one
    architecture apart (a fine-tune, another model), which the fingerprint cannot. Empty on the meta device."""
    state = {n: t for n, t in unet.state_dict().items() if t.dim() >= 2}
    names = sorted(state, key=lambda n: (-state[n].numel(), n))[:tensors]
    if not names or any(state[n].is_meta for n in names):
        return ()
    values: list[float] = []
    for n in names:
        flat = state[n].detach().reshape(-1)
        values += flat[np.linspace(0, flat.numel() - 1, per_tensor).astype(np.int64)].float().cpu().tolist()
    return tuple(float(f"{v:.6g}") for v in values)


def unet_source(unet: nn.Module) -> str:
    """Where the U-Net came from, as diffusers recorded it (hub id or local path), else its class name.

    A folder in the Hugging Face cache is named by its hub id: the cache path means nothing elsewhere.
    """
    from .models import hub_id_of

    config = getattr(unet, "config", None)
    path = str(getattr(config, "_name_or_path", "") or "") if config is not None else ""
    return hub_id_of(path) or path or type(unet).__name__


@dataclass(frozen=True, eq=False)
class MaskSet:
    units: tuple[Unit, ...]
    buckets: Buckets
    values: np.ndarray  # (len(buckets), len(units)) float64
    source: str = ""
    fingerprint: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    weights: tuple[float, ...] = ()  # `weights_sample` of the U-Net the masks were made on (empty: unknown)
    sampler: Sampler = field(default_factory=Sampler)  # the regime the masks were searched in (fields None: unknown)

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))
        object.__setattr__(self, "weights", tuple(float(v) for v in self.weights))
        rows = list(self.values) if not isinstance(self.values, np.ndarray) else self.values
        if len(rows) != len(self.buckets):
            raise MaskoptError(f"values has {len(rows)} rows but there are {len(self.buckets)} buckets")
        for k, row in enumerate(rows):
            if len(row) != len(self.units):
                raise MaskoptError(f"values row {k} has {len(row)} numbers but there are {len(self.units)} units")
        values = np.asarray(rows, dtype=np.float64).reshape(len(self.buckets), len(self.units))
        bad = ~np.isfinite(values) | (values < 0) | (values > MAX_VALUE)
        if bad.any():
            k, j = map(int, np.argwhere(bad)[0])
            raise MaskoptError(f"value {values[k, j]} for unit {self.units[j].key!r} in bucket {k} is outside [0, {MAX_VALUE}]")
        values.setflags(write=False)
        object.__setattr__(self, "values", values)
        keys = [u.key for u in self.units]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise MaskoptError(f"unit {dup!r} is listed twice")

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def ones(
        cls, unet: nn.Module, units: Sequence[Unit], buckets: Buckets | int = 1, source: str | None = None
    ) -> "MaskSet":
        """The identity mask set: every unit kept in every bucket (`buckets=K`: K uniform buckets of 1000)."""
        if isinstance(buckets, int):
            buckets = Buckets.uniform(buckets)
        for u in units:
            u.scales(unet)  # fail now, naming the unit, rather than at apply time
        return cls(
            units=tuple(units),
            buckets=buckets,
            values=np.ones((len(buckets), len(units))),
            source=source if source is not None else unet_source(unet),
            fingerprint=fingerprint(unet),
            weights=weights_sample(unet),
        )

    def with_values(self, values: Any, **provenance: Any) -> "MaskSet":
        return replace(self, values=np.asarray(values, dtype=np.float64), provenance={**self.provenance, **provenance})

    def with_sampler(self, sampler: Sampler) -> "MaskSet":
        return replace(self, sampler=sampler)

    # -- queries ------------------------------------------------------------------------------------

    def row(self, bucket: int) -> dict[Unit, float]:
        return dict(zip(self.units, map(float, self.values[bucket])))

    def removed(self, bucket: int) -> list[Unit]:
        return [u for u, v in self.row(bucket).items() if v == 0.0]

    def check(self, unet: nn.Module) -> None:
        """Refuse a U-Net this mask set was not made for (one-line MaskoptError); warn for other weights.

        Another architecture is refused. Other weights of the same architecture (a fine-tune) only get a
        warning: the masks apply, but were searched for other weights. fp16/bf16 rounding is not a difference.
        """
        fp = fingerprint(unet)
        if self.fingerprint and fp != self.fingerprint:
            raise MaskoptError(
                f"masks were made for U-Net {self.source or '?'} (fingerprint {self.fingerprint[:12]}), "
                f"not for this one (fingerprint {fp[:12]})"
            )
        for u in self.units:
            u.scales(unet)
        now = weights_sample(unet) if self.weights else ()
        if now and (len(now) != len(self.weights) or not np.allclose(now, self.weights, rtol=1e-2, atol=1e-4)):
            logger.warning("masks were searched on other weights of this architecture (%s), not on %s's: they "
                           "apply, but search again for masks tuned to these weights", self.source or "?", unet_source(unet))

    # -- file ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "weights_sample": list(self.weights),
            "num_train_timesteps": self.buckets.num_train_timesteps,
            "buckets": self.buckets.to_list(),
            "units": [u.to_dict() for u in self.units],
            "values": [[_tidy(v) for v in row] for row in self.values],
            "sampler": self.sampler.to_dict(),
            "provenance": {"maskopt": __version__, "created": _now(), **self.provenance},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (temp file + rename), so a crash never leaves half a mask file."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a mask file is meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_dict(cls, d: Any, where: str = "mask file") -> "MaskSet":
        if not isinstance(d, dict):
            raise MaskoptError(f"{where}: not a maskopt mask file (a JSON object is expected)")
        if d.get("format") not in (FORMAT, FORMAT_1):
            raise MaskoptError(f"{where}: format is {d.get('format')!r}, expected {FORMAT!r} (or {FORMAT_1!r})")
        for key in ("num_train_timesteps", "buckets", "units", "values"):
            if key not in d:
                raise MaskoptError(f"{where}: missing {key!r}")
        try:
            units = tuple(Unit.from_dict(u) for u in d["units"])
            buckets = Buckets(tuple(tuple(r) for r in d["buckets"]), int(d["num_train_timesteps"]))
            provenance = dict(d.get("provenance", {}))
            if d["format"] == FORMAT_1:  # a search wrote its settings into the provenance
                sampler = Sampler.from_search_config(provenance.get("config"))
            else:
                raw = d.get("sampler")
                sampler = Sampler() if raw is None else Sampler.from_dict(raw)
            return cls(
                units=units,
                buckets=buckets,
                values=d["values"],
                source=str(d.get("source", "")),
                fingerprint=str(d.get("fingerprint", "")),
                provenance=provenance,
                weights=tuple(d.get("weights_sample", ())),
                sampler=sampler,
            )
        except MaskoptError as e:
            raise MaskoptError(f"{where}: {e}") from None
        except (TypeError, KeyError, ValueError) as e:
            raise MaskoptError(f"{where}: malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike, unet: nn.Module | None = None) -> "MaskSet":
        """Read and validate a mask file; with `unet`, also check that it was made for that U-Net."""
        path = Path(path)
        if not path.is_file():
            raise MaskoptError(f"mask file {path} does not exist")
        masks = cls.from_dict(read_json(path, f"mask file {path}"), where=f"mask file {path}")
        if unet is not None:
            try:
                masks.check(unet)
            except MaskoptError as e:
                raise MaskoptError(f"mask file {path}: {e}") from None
        return masks


def read_json(path: Path, what: str) -> Any:
    """The JSON in `path`, or a one-line MaskoptError naming `what` when it does not parse."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MaskoptError(f"{what} is not valid JSON ({e})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tidy(v: float) -> float | int:
    # 1 and 0 stay short; other floats keep every digit (JSON's repr round-trips exactly).
    v = float(v)
    return int(v) if v.is_integer() else v


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

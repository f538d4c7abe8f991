"""`manifest.json`: what an export folder holds, enough for any runtime to pick a variant per timestep.

JSON, `"format": "maskopt.export/1"`, documented in docs/export-format.md. `Manifest.load(folder)`
re-hashes every file it lists and refuses a folder whose files changed.

`Manifest.load("export").variant_for(t)` is the variant whose bucket holds timestep t, and its
`files["onnx"].path` the file to run (the example in `maskopt.export` runs it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..buckets import Buckets, scalar_timestep
from ..errors import MaskoptError
from ..maskset import read_json
from .shapes import ShapeProfile, Signature
from .verify import Verification

FORMAT = "maskopt.export/1"
NAME = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the export folder, "/"-separated
    sha256: str
    bytes: int

    @classmethod
    def of(cls, root: Path, path: Path, seen: dict | None = None) -> "FileEntry":
        """The entry of `path` (relative to `root`); `seen` caches hashes by inode, so a file listed
        twice or hard-linked (the refit engine, Triton's model files) is read once."""
        path = Path(path)
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        digest = seen.get(key) if seen is not None else None
        if digest is None:
            digest = sha256(path)
            if seen is not None:
                seen[key] = digest
        return cls(path.relative_to(root).as_posix(), digest, st.st_size)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FileEntry":
        return cls(str(d["path"]), str(d["sha256"]), int(d["bytes"]))


@dataclass(frozen=True)
class Variant:
    """One bucket's U-Net: the timesteps it serves, its files by role, its parity results."""

    bucket: int
    timesteps: tuple[int, int]  # inclusive
    files: dict[str, FileEntry]  # "onnx", "onnx_data", "plan", "weights" (refit)
    verify: dict[str, Verification] = field(default_factory=dict)  # "onnx", "tensorrt"

    @property
    def name(self) -> str:
        return f"unet_b{self.bucket}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket, "name": self.name, "timesteps": list(self.timesteps),
            "files": {role: f.to_dict() for role, f in self.files.items()},
            "verify": {k: v.to_dict() for k, v in self.verify.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Variant":
        return cls(
            int(d["bucket"]), tuple(map(int, d["timesteps"])),  # type: ignore[arg-type]
            {role: FileEntry.from_dict(f) for role, f in d["files"].items()},
            {k: Verification.from_dict(v) for k, v in d.get("verify", {}).items()},
        )


@dataclass(frozen=True)
class Manifest:
    variants: tuple[Variant, ...]
    signature: Signature
    profile: ShapeProfile
    precision: str  # "fp32" | "fp16" (weights and compute; inputs and outputs are float32 either way)
    opset: int
    drop: bool
    masks: dict[str, Any]  # {"file", "sha256", "bytes", "fingerprint", "source", "sampler"}: the mask file this came from
    model: str | None  # the pipeline whose U-Net was baked: hub id, folder or maskopt:default (null means that too)
    num_train_timesteps: int = 1000
    engine: dict[str, Any] | None = None  # TensorRT build settings, when engines were built
    triton: dict[str, Any] | None = None  # {"repository", "model", "variants", "files"}
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def buckets(self) -> Buckets:
        return Buckets(tuple(v.timesteps for v in self.variants), self.num_train_timesteps)

    @property
    def refit(self) -> bool:
        return bool(self.engine and self.engine.get("refit"))

    def variant_for(self, timestep: Any) -> Variant:
        """The variant serving `timestep` (finite; floored, clamped): `timestep.rule`."""
        return self.variants[self.buckets.index(scalar_timestep(timestep))]  # Buckets.index refuses NaN and infinity

    def has(self, role: str) -> bool:
        return all(role in v.files for v in self.variants)

    def entries(self) -> list[FileEntry]:
        """Every file the manifest lists, once each."""
        seen: dict[str, FileEntry] = {}
        for f in [self._masks_entry(), *(f for v in self.variants for f in v.files.values()),
                  *(FileEntry.from_dict(f) for f in (self.triton or {}).get("files", []))]:
            if f is not None:
                seen.setdefault(f.path, f)
        return list(seen.values())

    def _masks_entry(self) -> FileEntry | None:
        m = self.masks
        return FileEntry(m["file"], m["sha256"], int(m["bytes"])) if m.get("file") else None

    # -- file ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "masks": self.masks,
            "model": self.model,
            "num_train_timesteps": self.num_train_timesteps,
            "timestep": {"dtype": "float32", "shape": [1],
                         "rule": "a finite timestep: floor, clamp to [0, num_train_timesteps - 1], use the variant whose timesteps hold it"},
            "precision": self.precision,
            "opset": self.opset,
            "drop": self.drop,
            **self.signature.to_dict(),
            "profile": self.profile.to_dict(self.signature),
            "engine": self.engine,
            "variants": [v.to_dict() for v in self.variants],
            "triton": self.triton,
            "provenance": {"maskopt": __version__, "created": _now(), **self.provenance},
        }

    def save(self, folder: Path) -> Path:
        path = Path(folder) / NAME
        path.write_text(dumps(self.to_dict()) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: Any, where: str = NAME) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise MaskoptError(f"{where}: format is {found!r}, expected {FORMAT!r}")
        try:
            return cls(
                variants=tuple(Variant.from_dict(v) for v in d["variants"]),
                signature=Signature.from_dict(d),
                profile=ShapeProfile.from_dict(d["profile"]),
                precision=str(d["precision"]),
                opset=int(d["opset"]),
                drop=bool(d["drop"]),
                masks=dict(d["masks"]),
                model=d["model"],
                num_train_timesteps=int(d.get("num_train_timesteps", 1000)),
                engine=d.get("engine"),
                triton=d.get("triton"),
                provenance=dict(d.get("provenance", {})),
            )
        except MaskoptError as e:
            raise MaskoptError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise MaskoptError(f"{where}: malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, folder: str | os.PathLike, check_hashes: bool = True) -> "Manifest":
        """Read `folder/manifest.json`; with `check_hashes`, refuse it if any listed file changed."""
        folder = Path(folder)
        path = folder / NAME
        if not path.is_file():
            raise MaskoptError(f"{folder} is not a maskopt export (no {NAME})")
        manifest = cls.from_dict(read_json(path, str(path)), where=str(path))
        if check_hashes:
            manifest.check_hashes(folder)
        return manifest

    def check_hashes(self, folder: Path) -> None:
        seen: dict = {}
        for f in self.entries():
            p = Path(folder) / f.path
            if not p.is_file():
                raise MaskoptError(f"{folder}: {f.path} is listed in {NAME} but missing")
            if p.stat().st_size != f.bytes or FileEntry.of(folder, p, seen).sha256 != f.sha256:
                raise MaskoptError(f"{folder}: {f.path} does not match its sha256 in {NAME} (changed or corrupt)")


def dumps(d: Any) -> str:
    """JSON with one key per line but short lists (shapes, ranges) kept on one line."""
    text = json.dumps(d, indent=1)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

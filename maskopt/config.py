"""Search settings as one plain dataclass; recipes are small YAML files of overrides.

Precedence: dataclass defaults < recipe (`--recipe FILE.yaml`) < command-line flags; then every default
that depends on other settings (the reward and prompts of the embedded default, the space's optimizer,
the pipeline's own sampler and size) is filled in one place, `complete`. The resolved config is saved
at the head of the journal and in the mask file's provenance.

    >>> cfg = resolve(budget=40)                       # the embedded default's recipe, one flag over it
    >>> cfg.model, cfg.reward, cfg.optimizer, cfg.scheduler, cfg.size, cfg.guidance
    ('maskopt:default', 'digits', 'DiscreteOnePlusOne', 'ddim', (32, 32), 1.0)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import MaskoptError, first_line
from .sampler import check_size, parse_size
from .sources import EMBEDDED

logger = logging.getLogger(__name__)

STRATEGIES = ("sweep", "joint")
RACE_MARGIN = 0.0  # benchmarks/time_to_gain.py, docs/benchmarks.md "Racing"
RACE_LOOKS = (0.25,)


@dataclass
class SearchConfig:
    """Every setting of a search. `resolve()` fills the ones left None here, so a resolved config holds
    no None: it is what the journal's header and the mask file's provenance record."""

    prompts: str | None = None  # prompt file; resolved: the embedded default's prompts, on that model only
    model: str = EMBEDDED  # hub id, local folder, or maskopt:default (the digits pipeline in the package)
    reward: str | None = None  # reward spec; resolved: "digits" on the embedded default, "clip" otherwise
    requires: list[str] = field(default_factory=list)  # bounds on set-level terms, e.g. diversity>=0.97 (objective.py)
    features: str | None = None  # for set-level terms; resolved: digits on the embedded default, else CLIP ViT-L/14
    reference: str | None = None  # images for the frechet term; resolved: maskopt:default (its held-out digits), else "none"
    targets: list[str] = field(default_factory=lambda: ["paper"])  # presets or module-name globs
    init: list[str] = field(default_factory=list)  # starting points: freeu, B1,B2, or mask files (starts.py)
    space: str = "gates"  # binary | gates | groups
    groups: int | None = None  # channel groups per layer; resolved: 4 in the groups space, else 1 (whole layers)
    gate_range: tuple[float, float] = (0.75, 1.25)  # gates space bounds (wider ranges bought reward with realism)
    buckets: int = 4  # K timestep buckets
    budget: int = 100  # evaluations, the all-ones baseline included
    optimizer: str | None = None  # nevergrad registry name; resolved: the space's default (space.DEFAULT_OPTIMIZER)
    strategy: str = "joint"  # joint: one optimizer over every bucket; sweep: one bucket at a time (sweep.py)
    workers: int = 1  # candidates asked at once and evaluated in one batch
    seeds: int = 2  # sampling seeds 0..S-1 per prompt, the same for every candidate
    steps: int = 15
    guidance: float = 7.5
    size: tuple[int, int] | None = None  # (H, W) in pixels; resolved: the pipeline's own
    scheduler: str | None = None  # sampler name; resolved: the pipeline's own (models.scheduler_name)
    holdout_prompts: str | None = None  # held-out prompt file; resolved: the embedded default's, else the search prompts
    holdout_seeds: int = 4  # unseen seeds for validation: 1000 .. 1000+N-1
    sparsity: float = 0.0  # objective bonus (>0) or penalty (<0) per unit removed (per bucket, / K)
    batch_size: int = 0  # images per candidate per pipeline call; 0: all of them at once
    cache: int = 256  # trajectory cache entries (U-Net outputs); 0 turns reuse off
    race: bool | None = None  # score in chunks, stop clear losers early (race.py); resolved: on, off with weighted set terms
    race_looks: list[float] = field(default_factory=lambda: list(RACE_LOOKS))  # shares of the images after which a candidate can stop
    race_alpha: float = 0.025  # nominal chance of stopping a candidate that would beat the incumbent by the margin
    race_margin: float = RACE_MARGIN  # indifference zone, in standard deviations of the baseline's per-image rewards
    seed: int = 0  # optimizer seed
    out: str | None = None  # resolved: a new runs/search-YYYYmmdd-HHMMSS, so rerunning never collides
    resume: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    ray: str = "off"  # evaluators on Ray (cluster.py): "local" (this machine), "auto", "ray://host:port"; off
    evaluators: int = 0  # Ray actors; 0: one per GPU with --device cuda, else one per CPU
    ray_gpus_per_evaluator: float = 1.0  # GPUs per Ray actor, with --device cuda

    # Settings that do not change what a search computes: free to differ on --resume.
    RUNTIME = ("out", "resume", "budget", "workers", "device", "cache", "batch_size", "ray", "evaluators",
               "ray_gpus_per_evaluator")

    @functools.cached_property
    def objective(self) -> Any:
        """The reward spec and the bounds, parsed once per config (objective.Objective)."""
        from .objective import Objective

        return Objective.parse(self.reward, self.requires)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SearchConfig":
        """Back from `to_dict` (a journal header's settings), every value checked as a recipe's would be."""
        return cls(**{k: _coerce(k, v) for k, v in values.items()})

    def settings(self) -> dict[str, Any]:
        """What the search computes with: every setting but the runtime ones (a journal's header keeps these)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME}

    def identity(self) -> dict[str, Any]:
        """What must match for --resume: every setting but the runtime ones, with equal spellings made equal.

        The prompt files are compared by their prompts (kept in the journal), not by path, so a moved file
        resumes and an edited one does not; a local model folder is compared by its absolute path.
        """
        d = {k: v for k, v in self.settings().items() if k not in ("prompts", "holdout_prompts")}
        if not self.race:  # the race's settings change nothing when it is off
            d = {k: v for k, v in d.items() if not k.startswith("race_")}
        if Path(self.model).expanduser().exists():
            d["model"] = str(Path(self.model).expanduser().resolve())
        return d

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def validate(self) -> None:
        for name in ("steps", "buckets", "budget", "seeds", "workers", "holdout_seeds", "groups"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MaskoptError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name, zero in (("cache", "no reuse"), ("batch_size", "all at once")):
            if getattr(self, name) < 0:
                raise MaskoptError(f"--{name.replace('_', '-')} must be 0 ({zero}) or more, got {getattr(self, name)}")
        if self.buckets > self.steps:
            raise MaskoptError(f"--buckets {self.buckets} is larger than the number of sampling steps ({self.steps})")
        looks = self.race_looks
        if not looks or any(not 0 < f < 1 for f in looks) or list(looks) != sorted(set(looks)):
            raise MaskoptError(f"--race-looks {','.join(map(str, looks)) or '(none)'}: give increasing shares of the "
                               "images between 0 and 1, e.g. 0.25 or 0.2,0.5")
        if not 0 < self.race_alpha < 1:
            raise MaskoptError(f"--race-alpha must be between 0 and 1 (an error rate), got {self.race_alpha}")
        if not self.race_margin >= 0:  # NaN too
            raise MaskoptError(f"--race-margin must be 0 or more (standard deviations of the baseline's rewards), "
                               f"got {self.race_margin}")
        if self.strategy not in STRATEGIES:
            raise MaskoptError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.size is not None:
            check_size(self.size)


def parse_range(text: str | tuple | list) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in (text.split(":") if isinstance(text, str) else text))
    except (ValueError, TypeError):
        raise MaskoptError(f"gate range {text!r} is not LO:HI, e.g. 0.75:1.25") from None
    return lo, hi


# settings older recipes and journals spell as null, and what that meant
_NULL_MEANT = {"model": EMBEDDED, "batch_size": 0}


def _coerce(name: str, value: Any) -> Any:
    """A setting's value from a recipe or a flag, in its field's type; MaskoptError naming it otherwise."""
    if value is None and name in _NULL_MEANT:
        return _NULL_MEANT[name]
    if name == "size":
        return parse_size(value)
    if name == "gate_range":
        return parse_range(value)
    if name == "race_looks":
        try:
            return [float(f) for f in (value.split(",") if isinstance(value, str) else [value] if
                                       isinstance(value, (int, float)) else value)]
        except (TypeError, ValueError):
            raise MaskoptError(f"race_looks {value!r}: give shares of the images, e.g. 0.25 or 0.2,0.5") from None
    if name in ("targets", "requires", "init"):
        value = [value] if isinstance(value, str) else list(value) if isinstance(value, tuple) else value
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value) or (name == "targets" and not value):
            raise MaskoptError(f"{name} {value!r}: give " + {"targets": "a preset or glob, or a list of them",
                                                             "requires": "a bound such as diversity>=0.97, or a list of them",
                                                             "init": "freeu, B1,B2 or a mask file, or a list of them"}[name])
        return value
    allowed = _TYPES[name]
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        value = float(value)  # guidance: 7 means 7.0
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise MaskoptError(f"setting {name!r} must be {want}, got {value!r}")
    return value


def _allowed(hint: Any) -> tuple[type, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for h in typing.get_args(hint) for t in _allowed(h))
    return (typing.get_origin(hint) or hint,)


_TYPES = {name: _allowed(hint) for name, hint in typing.get_type_hints(SearchConfig).items()}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe's overrides, checked against SearchConfig's fields (unknown keys name the valid ones)."""
    path = Path(path)
    if not path.is_file():
        raise MaskoptError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise MaskoptError(f"recipe {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise MaskoptError(f"recipe {path} is not valid YAML ({first_line(e)})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise MaskoptError(f"recipe {path} must be a mapping of setting: value (settings by name)")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    valid = {f.name for f in fields(SearchConfig)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise MaskoptError(f"recipe {path}: unknown setting {unknown[0]!r}; valid: {', '.join(sorted(valid))}")
    return data


def resolve(recipe: str | None = None, **flags: Any) -> SearchConfig:
    """The search's settings from defaults, then the recipe, then the flags that were given (not None),
    with every default filled (`complete`).

    Without a recipe, on the embedded default, its own recipe applies (its sampler settings differ
    from SD's: see maskopt/default/recipe.yaml).
    """
    if recipe is None and flags.get("model") in (None, EMBEDDED):
        from .default import RECIPE_PATH

        recipe = str(RECIPE_PATH)
    try:  # every recipe value is checked, also those a flag overrides
        values = {k: _coerce(k, v) for k, v in (load_recipe(recipe) if recipe else {}).items()}
    except MaskoptError as e:
        raise MaskoptError(f"{e} (recipe {recipe})") from None
    values.update({k: _coerce(k, v) for k, v in flags.items() if v is not None and v != ()})
    cfg = SearchConfig(**values)
    if flags.get("gate_range") is not None and cfg.space != "gates":  # a recipe may carry it for --space gates
        logger.warning("--gate-range bounds the gates space only; with --space %s it is not used", cfg.space)
    return complete(cfg)


def complete(cfg: SearchConfig) -> SearchConfig:
    """`cfg`, checked, with every setting left None filled with its default; a complete config comes back equal.

    The pipeline's own sampler and image size are read from its config files (no weights are loaded).
    """
    from . import default
    from .features import CLIP_DEFAULT
    from .models import check_scheduler, pipeline_info
    from .space import default_optimizer

    cfg.validate()
    embedded = cfg.model == EMBEDDED
    fill: dict[str, Any] = {}
    if cfg.out is None:
        if cfg.resume:
            raise MaskoptError("--resume needs --out: the folder of the search to continue")
        fill["out"] = time.strftime("runs/search-%Y%m%d-%H%M%S")
    if cfg.prompts is None:
        if not embedded:
            raise MaskoptError("--prompts is required with --model (the shipped prompts are for the embedded digits model)")
        fill["prompts"] = str(default.PROMPTS_PATH)
        if cfg.holdout_prompts is None:  # the shipped prompts come with shipped held-out phrasings
            fill["holdout_prompts"] = str(default.HOLDOUT_PROMPTS_PATH)
    fill.setdefault("holdout_prompts", cfg.holdout_prompts or fill.get("prompts") or cfg.prompts)
    fill["reward"] = cfg.reward or ("digits" if embedded else "clip")
    fill["features"] = cfg.features or ("digits" if embedded else CLIP_DEFAULT)
    fill["reference"] = cfg.reference or (EMBEDDED if embedded else "none")
    fill["optimizer"] = cfg.optimizer or default_optimizer(cfg.space)
    fill["groups"] = cfg.groups or (4 if cfg.space == "groups" else 1)
    fill["race"] = _race(cfg)
    # files that exist are recorded by absolute path: a mask file's provenance is read from other folders (eval)
    for name in ("prompts", "holdout_prompts", "reference"):
        value = fill.get(name, getattr(cfg, name))
        if value and value not in (EMBEDDED, "none") and Path(value).expanduser().exists():
            fill[name] = str(Path(value).expanduser().resolve())
    fill["init"] = [str(Path(i).expanduser().resolve()) if i != "freeu" and Path(i).expanduser().is_file() else i
                    for i in cfg.init]
    if cfg.scheduler is not None:
        check_scheduler(cfg.scheduler)
    if cfg.scheduler is None or cfg.size is None:
        info = pipeline_info(cfg.model)
        fill["scheduler"] = cfg.scheduler or info.scheduler
        fill["size"] = cfg.size or info.size
    return dataclasses.replace(cfg, **fill)


def _race(cfg: SearchConfig) -> bool:
    """Racing compares per-image rewards; a weighted set-level term (diversity, frechet) is only known on the
    whole set, so a partial candidate's objective cannot be bounded: such searches score every image.
    Bounds alone (--require) can only make a full score worse, so they race."""
    from .objective import Objective

    weighted = Objective.parse(cfg.reward or "digits", cfg.requires).weights if cfg.reward else {}
    if weighted and cfg.race:
        raise MaskoptError(f"--race: the reward weighs set-level terms ({', '.join(weighted)}), known only once every "
                           "image is scored; pass --no-race, or bound them with --require instead")
    return False if weighted else (True if cfg.race is None else cfg.race)

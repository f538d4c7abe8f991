"""A search's evaluators on Ray: one actor per GPU (or a given number on CPU), the driver keeping the rest.

    maskopt search --ray                      # a local Ray instance on this machine
    maskopt search --ray auto                 # the cluster this machine belongs to (`ray start` ran here)
    maskopt search --ray ray://head:10001     # a remote cluster, through Ray Client

The driver keeps the optimizer, the journal and the ask/tell order exactly as a local search does: it asks
a group of `--workers` candidates, and `RayEvaluators.score` spreads the group over the actors and returns
the evaluations in the group's order. So a Ray search journals what a local search with the same settings
journals (rewards equal to float rounding: an actor scores its share of the group as one batch), and
`--resume` works across both. Every optimizer runs in groups, as locally; none is told out of order.

Each actor loads the pipeline and the reward once and keeps its own trajectory cache. A candidate goes to
the actor that scored the candidate sharing its longest prefix of visited buckets (the one whose cache
can replay most), as long as every actor gets its share of the group.

Faults: an actor that dies (its process killed, its node lost) has its candidates scored again on
another; Ray restarts it when resources allow (`max_restarts=-1`), and it is used again once it answers.
Nothing is journaled before the whole group is back, so nothing is lost or journaled twice. A reward that
raises inside an actor is the same one-line error as locally, the journal kept.

Ray is an optional extra (`pip install -e ".[ray]"`): this module imports it only when a search asks.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import MaskoptError, first_line

logger = logging.getLogger(__name__)

LOCAL = "local"  # --ray with no address: a Ray instance of this machine, started and stopped by the search
OFF = "off"  # no --ray: the search evaluates in its own process
HISTORY = 64  # candidates remembered per actor for routing (its cache holds about as many)
START_TIMEOUT = 600  # seconds the actors may take to load their pipelines before the search gives up on them
MAX_ROUNDS = 4  # a group whose evaluators die this many times in a row ends the search


def import_ray() -> Any:
    """Ray, or the one-line error that says how to install it."""
    from .lazy import require

    return require("ray", 'pip install -e ".[ray]" (or pip install "ray[default]")', reason="--ray needs Ray")


def check(address: str, evaluators: int, gpus: float) -> None:
    """What `--ray` needs, checked before any model loads."""
    if address == OFF:
        if evaluators != 0 or gpus != 1.0:
            raise MaskoptError("--evaluators and --ray-gpus-per-evaluator need --ray")
        return
    if not (address in (LOCAL, "auto") or address.startswith("ray://") or ":" in address):
        raise MaskoptError(f"--ray {address!r}: give no address (a local instance), auto, HOST:PORT or ray://HOST:PORT")
    if evaluators < 0:
        raise MaskoptError(f"--evaluators must be at least 1 (or 0: one per GPU or CPU), got {evaluators}")
    if not gpus > 0:
        raise MaskoptError(f"--ray-gpus-per-evaluator must be more than 0, got {gpus}")
    import_ray()


def prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many buckets, in the order the sampler visits them (highest timesteps, the last row, first), two
    candidates share before they differ: the steps a cache holding one replays for the other."""
    n = 0
    for k in range(len(a) - 1, -1, -1):
        if not np.array_equal(a[k], b[k]):
            break
        n += 1
    return n


def route(group: Sequence[np.ndarray], history: Sequence[Sequence[np.ndarray]]) -> list[int]:
    """The actor of each candidate: the longest shared prefix with what it scored, each actor at most its share."""
    share = math.ceil(len(group) / len(history))
    load = [0] * len(history)
    out = []
    for v in group:
        best = max(range(len(history)), key=lambda a: (load[a] < share, max((prefix(v, u) for u in history[a]), default=0),
                                                       -load[a], -a))
        load[best] += 1
        out.append(best)
    return out


class _Actor:
    """One evaluator: the pipeline, the reward and a trajectory cache, loaded once (runs inside a Ray actor)."""

    def __init__(self, settings: dict, prompts: list[str]) -> None:
        from .config import SearchConfig
        from .evaluators import search_evaluator

        logging.basicConfig(level=logging.WARNING)
        self.evaluator = search_evaluator(SearchConfig.from_dict(settings), prompts)

    def score(self, group: list[np.ndarray], plan: Any, against: Any) -> list[Any]:
        return self.evaluator.score(group, plan, against)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


@dataclass
class Stats:
    started: int = 0  # actors started: asked for, and restarted by Ray after a death
    deaths: int = 0
    requeued: int = 0  # candidates scored again after their actor died


class RayEvaluators:
    """`score(group, plan, against)` as one Evaluator's, the group spread over Ray actors."""

    def __init__(self, address: str, settings: dict, prompts: list[str], device: str, evaluators: int = 0,
                 gpus: float = 1.0) -> None:
        ray = self.ray = import_ray()
        # Without it Ray (on Linux too) picks this machine's non-loopback address even when told 127.0.0.1, and a
        # local cluster's driver can hang for minutes connecting to it instead of failing
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.owns = address == LOCAL and not ray.is_initialized()
        self.actors: list[Any] = []
        if not ray.is_initialized():
            # a local instance's workers see this process's PYTHONPATH (python:module:function rewards); a
            # cluster's nodes have their own environment (README, "Scaling")
            local_path = address == LOCAL and os.environ.get("PYTHONPATH")
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if local_path else None)
        try:
            resources = ray.cluster_resources()
            if device.startswith("cuda"):
                if resources.get("GPU", 0) < gpus:
                    raise MaskoptError(f"--device {device} --ray: the Ray cluster has {resources.get('GPU', 0):g} GPU(s), "
                                       f"an evaluator needs {gpus:g}")
                n = evaluators or max(1, int(resources["GPU"] // gpus))
                options = {"num_gpus": gpus, "num_cpus": 1}
            else:
                n = evaluators or max(1, int(resources.get("CPU", 1)))
                options = {"num_cpus": max(1, int(resources.get("CPU", 1)) // n)}
            self.remote = ray.remote(max_restarts=-1, max_task_retries=0, **options)(_Actor)
            self.settings, self.prompts = settings, prompts
            self.stats = Stats()
            self.actors = [self._start() for _ in range(n)]
            self.history: list[list[np.ndarray]] = [[] for _ in range(n)]
            self._pings: dict[int, Any] = {}  # a down actor's pending pid() call: it answers once Ray restarted it
            self.pids = self._wait_ready(range(n))
        except BaseException:
            self.close()
            raise
        logger.info("%d evaluators on Ray (%s): %s", n, address, options)

    @property
    def alive(self) -> int:
        return len(self.pids)

    def _start(self) -> Any:
        self.stats.started += 1
        return self.remote.remote(self.settings, self.prompts)

    def _wait_ready(self, which: Sequence[int], timeout: float = START_TIMEOUT) -> dict[int, int]:
        """{actor: pid} of the actors in `which` that answer within one shared `timeout`; an error while an
        actor loads (the model missing on its node, a reward it cannot import) is the search's error."""
        ray = self.ray
        refs = {self.actors[a].pid.remote(): a for a in which}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        out = {}
        for ref in ready:
            a = refs[ref]
            try:
                out[a] = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if getattr(e, "actor_init_failed", False):
                    raise _cause(e) from None
                logger.warning("evaluator %d did not start: %s", a, first_line(e))
            except ray.exceptions.RayError as e:
                raise _cause(e) from None
        if not out:
            raise MaskoptError(f"no Ray evaluator started within {timeout:.0f} s (ray status shows what the cluster "
                               "has; the logs are in /tmp/ray/session_latest/logs)")
        return out

    def score(self, group: list[np.ndarray], plan: Any = None, against: Any = None) -> list[Any]:
        ray = self.ray
        results: list[Any] = [None] * len(group)
        todo = list(range(len(group)))
        rounds = 0
        while todo:
            rounds += 1
            if rounds > MAX_ROUNDS:  # evaluators die on these candidates every time: not a passing fault
                raise MaskoptError(f"Ray evaluators died {MAX_ROUNDS} times while scoring one group of candidates "
                                   "(out of memory? see ray status and /tmp/ray/session_latest/logs)")
            live = sorted(self.pids)
            owners = route([group[i] for i in todo], [self.history[a] for a in live])
            jobs = {}
            for a in live:
                members = [todo[j] for j, o in enumerate(owners) if live[o] == a]
                if members:
                    sub = against.subset(members) if against is not None else None
                    jobs[self.actors[a].score.remote([group[i] for i in members], plan, sub)] = (a, members)
            todo = []
            for ref, (a, members) in jobs.items():
                try:
                    evs = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # raised inside the actor: the reward, the pipeline
                    raise _cause(e) from None
                except ray.exceptions.RayActorError as e:
                    self.stats.deaths += 1
                    self.stats.requeued += len(members)
                    logger.warning("evaluator %d died (%s): its %d candidate(s) go to another", a, first_line(e),
                                   len(members))
                    self.pids.pop(a, None)
                    self.history[a] = []
                    todo.extend(members)
                    continue
                except ray.exceptions.RayError as e:  # lost objects, the memory monitor, ...: one line
                    raise _cause(e) from None
                for i, ev in zip(members, evs):
                    results[i] = ev
                self.history[a] = (self.history[a] + [group[i] for i in members])[-HISTORY:]
            if todo and not self.pids:  # every actor is down: wait for Ray to restart one
                self._revive()
            self._rejoin()
        return results

    def _revive(self) -> None:
        """Every actor is down: wait for Ray to restart them (max_restarts), or start new ones in their place."""
        logger.warning("every evaluator is down: waiting for Ray to restart them")
        self._pings = {}
        try:
            self.pids = self._wait_ready(range(len(self.actors)))
        except MaskoptError:
            for actor in self.actors:
                self._kill(actor)
            self.actors = [self._start() for _ in self.actors]
            self.pids = self._wait_ready(range(len(self.actors)))

    def _rejoin(self) -> None:
        """Actors Ray has restarted since they died answer again: they take their share from the next group.
        One pid() call waits per down actor; nothing waits for it."""
        for a in range(len(self.actors)):
            if a not in self.pids and a not in self._pings:
                self._pings[a] = self.actors[a].pid.remote()
        if not self._pings:
            return
        ready, _ = self.ray.wait(list(self._pings.values()), num_returns=len(self._pings), timeout=0)
        for a, ref in list(self._pings.items()):
            if ref in ready:
                del self._pings[a]
                try:
                    self.pids[a] = self.ray.get(ref)
                    self.stats.started += 1  # Ray restarted it
                    logger.info("evaluator %d is back", a)
                except Exception:  # noqa: BLE001 - still down: asked again after the next group
                    pass

    def _kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def close(self) -> None:
        for actor in self.actors:
            self._kill(actor)
        if self.owns:
            self.ray.shutdown()


def _cause(e: Exception) -> Exception:
    """The exception raised inside an actor, as it was raised (a MaskoptError keeps its one line)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, MaskoptError):
        return MaskoptError(str(cause))
    if isinstance(cause, BaseException):
        return MaskoptError(f"a Ray evaluator raised {type(cause).__name__}: {first_line(cause)}")
    # an actor whose __init__ raised (ActorDiedError): the traceback is in the message, its error last
    said = [line.split("MaskoptError: ", 1)[1] for line in str(e).splitlines() if "MaskoptError: " in line]
    if said:
        return MaskoptError(said[-1].strip())
    return MaskoptError(f"a Ray evaluator failed: {type(e).__name__}: {first_line(e)}")


def search_evaluators(cfg: Any, prompts: list[str], loaded: Any) -> Any:
    """A search's evaluators (evaluators.Evaluators): in this process, or Ray actors that load their own
    pipeline, reward and cache. `cfg` is the search's SearchConfig, `loaded` what it loaded (evaluators.Loaded)."""
    from .evaluators import search_evaluator

    if cfg.ray == OFF:
        return search_evaluator(cfg, prompts, loaded)
    evaluators = RayEvaluators(cfg.ray, cfg.to_dict(), prompts, cfg.device, cfg.evaluators, cfg.ray_gpus_per_evaluator)
    if cfg.workers < evaluators.alive:
        logger.warning("--workers %d asks fewer candidates at once than the %d evaluators: %d of them wait; "
                       "pass --workers %d", cfg.workers, evaluators.alive, evaluators.alive - cfg.workers, evaluators.alive)
    return evaluators

"""Plain reward functions for the python:module:function tests (tests/ is on sys.path via conftest)."""

import os
import signal

import torch


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def prompt_length(images: torch.Tensor, prompts: list[str]) -> list[float]:
    return [float(len(p)) for p in prompts]


def one_score(images: torch.Tensor, prompts: list[str]) -> list[float]:
    return [1.0]


_calls = {"n": 0}


def flaky(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Brightness, but NaN on every second call: the search must score those candidates as failed."""
    _calls["n"] += 1
    scores = images.mean(dim=(1, 2, 3))
    return scores * float("nan") if _calls["n"] % 2 == 0 else scores


def raises(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    raise RuntimeError("boom")


def always_nan(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3)) * float("nan")


_raise_after = {"n": 0, "at": 3}


def raises_later(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Brightness for a while, then an exception: evaluations before it must stay journaled."""
    _raise_after["n"] += 1
    if _raise_after["n"] >= _raise_after["at"]:
        raise RuntimeError("model server went away")
    return images.mean(dim=(1, 2, 3))


_die = {"n": 0}


def dies(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Brightness; but on call MASKOPT_TEST_DIE_AT (if set) the process SIGKILLs itself, mid-evaluation."""
    _die["n"] += 1
    if _die["n"] == int(os.environ.get("MASKOPT_TEST_DIE_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return images.mean(dim=(1, 2, 3))


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The red channel's mean: a second judge for the eval tests."""
    return images[:, 0].mean(dim=(1, 2))


_die_once = {"n": 0}


def dies_once(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Brightness; on its MASKOPT_TEST_DIE_AT-th call in a process other than MASKOPT_TEST_DRIVER_PID, the first
    process to get there SIGKILLs itself (a marker file, MASKOPT_TEST_DIE_MARKER, makes it once): a Ray evaluator
    killed mid-evaluation, the driver spared."""
    _die_once["n"] += 1
    marker = os.environ.get("MASKOPT_TEST_DIE_MARKER")
    if marker and os.getpid() != int(os.environ.get("MASKOPT_TEST_DRIVER_PID", "0")) \
            and _die_once["n"] == int(os.environ.get("MASKOPT_TEST_DIE_AT", "3")):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return images.mean(dim=(1, 2, 3))

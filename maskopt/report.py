"""report.md for a search: reward versus evaluations, the chosen values as a heatmap, image grids."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .config import SearchConfig
from .journal import Entry
from .maskset import MaskSet
from .stats import SMALL_N, Paired

logger = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_progress(entries: Sequence[Entry], path: Path) -> None:
    plt = _plt()
    r = np.array([e.reward if e.choosable else np.nan for e in entries])
    best = np.fmax.accumulate(np.nan_to_num(r, nan=-np.inf))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(r, ".", alpha=0.5, label="candidate")
    stopped = [(e.i, e.partial["estimate"]) for e in entries if e.partial is not None and not e.failed]
    if stopped:
        ax.plot(*zip(*stopped), "x", color="gray", alpha=0.4, ms=3, label="stopped early (paired estimate)")
    ax.plot(best, "-", label="best so far")
    ax.axhline(r[0], color="gray", ls="--", lw=1, label="baseline (all ones)")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("mean reward (search prompts x seeds)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heatmap(masks: MaskSet, path: Path) -> None:
    plt = _plt()
    values = masks.values[::-1]  # first-visited bucket (highest timesteps) on top
    fig, ax = plt.subplots(figsize=(min(2 + 0.12 * values.shape[1], 24), 1 + 0.45 * values.shape[0]))
    im = ax.imshow(values, aspect="auto", cmap="RdBu", vmin=0, vmax=2, interpolation="nearest")
    ax.set_yticks(range(len(values)), [f"t {lo}-{hi}" for lo, hi in masks.buckets.ranges[::-1]], fontsize=7)
    ax.set_xlabel(f"unit (0..{values.shape[1] - 1}, in masks.json order)")
    fig.colorbar(im, ax=ax, label="value (1 keeps, 0 removes)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_grid(rows: Sequence[torch.Tensor], path: Path) -> None:
    """Images (N, 3, H, W) in [0, 1], one row per tensor, saved as one PNG."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*H, N*W)
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    if img.height < 256:  # tiny models: upscale so a person can see the digits
        f = max(1, 256 // img.height)
        img = img.resize((img.width * f, img.height * f), Image.NEAREST)
    img.save(path)


def _set_terms(cfg: SearchConfig, p: dict) -> str:
    """The lines on set-level terms: the bounds, how many candidates broke them, the held-out ratios."""
    if "holdout_measures" not in p:
        return ""
    held = ", ".join(f"{t} {m['ratio']:.3f} of the baseline's" for t, m in p["holdout_measures"].items())
    bounds = ", ".join(cfg.requires) or "none"
    return (f"\n- set-level terms: bounds {bounds}; {p['infeasible']} candidates broke them (never chosen); "
            f"held-out, the chosen masks: {held}")


def _racing(cfg: SearchConfig, entries: Sequence[Entry]) -> str:
    """The line on racing: how many candidates stopped early and the images they left unscored."""
    if not cfg.race:
        return ""
    n = max(e.images or 0 for e in entries)
    scored = sum(n if e.images is None else e.images for e in entries)
    stopped = sum(e.partial is not None for e in entries)
    return (f"\n- racing (looks {','.join(f'{x:g}' for x in cfg.race_looks)}, alpha {cfg.race_alpha:g}, margin {cfg.race_margin:g} sd): {stopped} of "
            f"{len(entries)} candidates stopped early; {scored} images scored of {n * len(entries)} "
            f"({scored / max(n * len(entries), 1):.2f})")


def write_report(
    out: Path,
    cfg: SearchConfig,
    masks: MaskSet,
    entries: Sequence[Entry],
    holdout: Paired,
    holdout_prompts: Sequence[str],
    baseline_images: torch.Tensor,
    masked_images: torch.Tensor,
    notes: Sequence[str] = (),
) -> Path:
    plot_progress(entries, out / "progress.png")
    plot_heatmap(masks, out / "values.png")
    n = min(8, len(holdout_prompts))
    save_grid([baseline_images[:n], masked_images[:n]], out / "grid.png")
    p = masks.provenance
    removed = int((masks.values == 0).sum())
    runs = f" (runs {p['optimizer_runs']})" if p.get("optimizer_runs", p["optimizer"]) != p["optimizer"] else ""
    verdict = (
        f"**Held-out gain: {holdout.diff:+.4f}** (95% CI {holdout.ci_low:+.4f} to {holdout.ci_high:+.4f})"
        if holdout.ci_low > 0
        else f"**No held-out gain**: the difference {holdout.diff:+.4f} has a 95% CI of "
        f"{holdout.ci_low:+.4f} to {holdout.ci_high:+.4f}, which "
        + ("is below 0 (a loss)." if holdout.ci_high < 0 else "includes 0.")
    )
    if holdout.n < SMALL_N:
        verdict += (f"\n\nThis rests on {holdout.n} images: below {SMALL_N}, a 95% interval on the embedded default held the "
                    "true gain only 76-89% of the time (docs/benchmarks.md); raise --holdout-seeds for a firmer figure.")
    hits = sum(e.cache_hits or 0 for e in entries)
    calls = sum(e.unet_calls or 0 for e in entries)
    text = f"""# maskopt search report

{verdict}

| | reward |
| --- | --- |
| baseline, search prompts x {cfg.seeds} seeds | {p['baseline_search_reward']:.4f} |
| best (evaluation {p['best_evaluation']}), search prompts | {p['search_reward']:.4f} |
| baseline, held-out ({holdout.n} images) | {holdout.baseline:.4f} |
| masked, held-out | {holdout.masked:.4f} |

- model: `{cfg.model}`, reward: `{p['reward']}`, space: `{cfg.space}`, optimizer: `{p['optimizer']}`{runs} ({cfg.strategy})
- {len(masks.units)} units x {len(masks.buckets)} buckets, {removed} (bucket, unit) values at 0
- {len(entries)} evaluations, {sum(e.seconds for e in entries):.0f} s; trajectory cache replayed {hits} of {hits + calls} U-Net calls{_racing(cfg, entries)}{_set_terms(cfg, p)}{"".join(chr(10) + "- " + n for n in notes)}
- sampler (recorded in masks.json; generate and export default to it): {masks.sampler.describe()}, {cfg.dtype}

## Reward versus evaluations
![progress](progress.png)

## Chosen values (bucket x unit)
![values](values.png)

## Held-out prompts: baseline (top) vs masked (bottom)
{', '.join(f'`{q}`' for q in holdout_prompts[:n])}

![grid](grid.png)
"""
    path = out / "report.md"
    path.write_text(text)
    return path

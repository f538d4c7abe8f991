"""Where a search spent its U-Net time and where its reward came from, read from journals (no model needed).

    python benchmarks/stage_gains.py runs/search-*/journal.jsonl

Every evaluation is filed under the first visited bucket (highest timesteps first) in which it differs from
the best candidate so far: that is where trajectory reuse stops, so it sets how many U-Net calls the
evaluation had to run. Per group: evaluations, U-Net calls run (from the journal), the search reward the
group added to the best (the sum of its improvements), and after how many of its own evaluations it had
90% of that. The sweep's groups are its stages; the joint search's are mostly "several" (it moves every
bucket at once).

Why it exists: the only way to replay a larger share of U-Net calls is to spend more evaluations in the
late buckets, which are cheap. This shows what those evaluations bought.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from maskopt.journal import read


def groups(entries: list[dict]) -> dict[str, dict]:
    """{group: evaluations, unet_calls, gain, to_90}; group = the first visited bucket that differs."""
    out: dict[str, dict] = {}
    best = np.asarray(entries[0].values)
    best_reward = entries[0].reward
    for e in entries[1:]:
        values = np.asarray(e.values)
        changed = [k for k in range(len(values)) if not np.array_equal(values[k], best[k])]
        # several changed buckets: reuse still stops at the first visited one (the highest index)
        name = "none" if not changed else (f"bucket {changed[0]}" if len(changed) == 1 else f"several, from {max(changed)}")
        g = out.setdefault(name, {"evaluations": 0, "unet_calls": 0, "gain": 0.0, "steps": []})
        g["evaluations"] += 1
        g["unet_calls"] += (e.unet_calls or 0)
        if e.choosable and e.reward > best_reward:  # a raced candidate stopped early has a partial mean
            g["gain"] += e.reward - best_reward
            g["steps"].append((g["evaluations"], g["gain"]))
            best, best_reward = values, e.reward
    for g in out.values():  # how soon the group had 90% of its gain (counted in its own evaluations)
        g["to_90"] = next((n for n, gain in g.pop("steps") if gain >= 0.9 * g["gain"]), 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("journals", nargs="+", type=Path)
    args = ap.parse_args()
    for path in args.journals:
        header, entries, _ = read(path)
        if header is None or len(entries) < 2:
            raise SystemExit(f"{path}: not a search journal with evaluations")
        calls = sum((e.unet_calls or 0) for e in entries[1:])
        hits = sum((e.cache_hits or 0) for e in entries[1:])
        total_gain = max(e.reward for e in entries if e.choosable) - entries[0].reward
        print(f"{path}: {header.get('strategy', 'joint')}, {len(entries)} evaluations, U-Net calls replayed "
              f"{hits}/{hits + calls}, search reward {entries[0].reward:.4f} -> +{total_gain:.4f}")
        print(f"  {'first changed bucket':24} {'evaluations':>11} {'U-Net calls run':>16} {'share':>6} {'reward gain':>12} {'90% of it by':>13}")
        # first visited (most U-Net calls per evaluation) first; "several" groups after the single buckets
        order = lambda name: (name.startswith("several"), name == "none", -int(name.split()[-1]) if name != "none" else 0)
        for name, g in sorted(groups(entries).items(), key=lambda kv: order(kv[0])):
            print(f"  {name:24} {g['evaluations']:11d} {g['unet_calls']:16d} {g['unet_calls'] / max(calls, 1):6.0%} "
                  f"{g['gain']:+12.4f} {g['to_90']:13d}")


if __name__ == "__main__":
    main()

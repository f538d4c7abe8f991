"""The default search with today's settings spelled out writes the mask values pinned before the redesign of
issue 23 (tests/data/pinned/default-masks.json, written at fb83608), bit for bit. About 4 minutes on 2 cores,
so it lives here rather than in the suite (tests/test_pinned.py pins two short searches there).

    python benchmarks/pinned_default.py [--out runs/pinned-default]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PINNED = Path(__file__).parents[1] / "tests" / "data" / "pinned" / "default-masks.json"
SETTINGS = ["--model", "maskopt:default", "--reward", "digits", "--targets", "paper", "--space", "groups", "--groups",
            "4", "--buckets", "4", "--budget", "400", "--seeds", "2", "--steps", "15", "--guidance", "1.0",
            "--workers", "4"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp()) / "run"
    subprocess.run([sys.executable, "-m", "maskopt.cli", "search", *SETTINGS, "--out", str(out)], check=True)
    got = json.loads((out / "masks.json").read_text())
    want = json.loads(PINNED.read_text())
    same = got["values"] == want["values"]
    print(f"mask values {'equal' if same else 'DIFFER'} bit for bit; search reward {got['provenance']['search_reward']!r} "
          f"(pinned {want['search_reward']!r}); held-out {got['provenance']['holdout']['diff']!r} "
          f"(pinned {want['holdout']['diff']!r})")
    sys.exit(0 if same and got["provenance"]["holdout"] == want["holdout"] else 1)


if __name__ == "__main__":
    main()

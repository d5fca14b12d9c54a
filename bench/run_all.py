"""Run every benchmark figure in this folder (each prints its table and writes bench/out/<figure>.json).

    python bench/run_all.py                          # every figure at its defaults (full sizes on a GPU)
    python bench/run_all.py --only grpo_epoch,gradient_snr
    python bench/run_all.py --list

Each figure runs with the arguments below; a figure's own defaults pick full-size
architectures when CUDA is available and tiny ones otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

FIGURES: dict[str, list[str]] = {
    "sampler_vs_pipeline": [],
    "reward_throughput": [],
    "refl_step": [],
    "dpo_step": [],
    "grpo_epoch": [],
    "reward_server": [],
    "fsdp_overhead": [],
    "search_samplers": ["--quick"],
    "gradient_snr": ["--config", "recipes/shapes_oracle_grpo.yaml", "--rollouts", "4"],
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated figure names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the figures and their arguments")
    args = parser.parse_args()
    names = list(FIGURES) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        sys.exit(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    here = Path(__file__).resolve().parent
    for name in names:
        if args.list:
            print(name, *FIGURES[name])
            continue
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(here / f"{name}.py"), *FIGURES[name]], check=True, cwd=here.parent)

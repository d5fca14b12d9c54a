"""Run every benchmark figure in this folder (each prints its table and writes bench/out/<figure>.json)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FIGURES = ["sampler_vs_pipeline.py", "reward_throughput.py", "refl_step.py", "dpo_step.py"]

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for script in FIGURES:
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(here / script), *sys.argv[1:]], check=True, cwd=here)

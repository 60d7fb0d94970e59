"""benchmarks/plot.py run as a script on a tiny hand-made engine_speed.py --json table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {"name": "reference: fixed, steps=gen_length, no cache", "acc": 70.0, "tps": 1.8},
    {"name": "Fast-dLLM: threshold 0.9, dual cache, no early stop", "acc": 69.0, "tps": 61.9},
    {"name": "fixed + none", "acc": 70.0, "tps": 14.4},
    {"name": "threshold + dual", "acc": 69.0, "tps": 313.2},
    {"name": "credit + vicinity", "acc": 68.0, "tps": 318.3},
]


def run(*args: str) -> subprocess.CompletedProcess:
    script = ROOT / "benchmarks" / "plot.py"
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120
    )


def test_plot_writes_a_png(tmp_path):
    table = tmp_path / "speed.json"
    settings = {"prompts": 5, "gen_length": 64, "block_length": 32, "device": "cpu"}
    table.write_text(json.dumps({"settings": settings, "rows": ROWS}))
    done = run(str(table), str(tmp_path / "speed.png"))
    assert done.returncode == 0, done.stderr
    png = (tmp_path / "speed.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_a_file_that_is_not_a_table_is_one_line_and_exit_2(tmp_path):
    table = tmp_path / "speed.json"
    table.write_text(json.dumps({"rows": [{"name": "x"}]}))
    done = run(str(table))
    assert done.returncode == 2 and not (tmp_path / "speed.png").exists()
    assert len(done.stderr.strip().splitlines()) == 1 and "name/acc/tps" in done.stderr

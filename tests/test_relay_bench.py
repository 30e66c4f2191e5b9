"""The relay benchmark still runs end to end (tiny N): every mail sent through the baseline and
through mailgw arrives at the sink exactly once. Counts only; the figures are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_relay_bench_delivers_every_mail_once(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "relay_bench.py"), "--n", "12", "-c", "3",
                           "--warm-up", "3", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {run["server"]: run for run in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"baseline", "mailgw"}
    for run in runs.values():
        assert (run["sent"], run["accepted"], run["arrived"], run["duplicates"]) == (12, 12, 12, 0), run
    assert "mailgw / baseline" in done.stdout

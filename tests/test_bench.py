"""The request-path benchmark still runs end to end (tiny N): every mail it sends to mailgw is
accepted and becomes exactly one call. Counts only; the figures themselves are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_request_path_bench_places_one_call_per_accepted_mail(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "request_path.py"), "--n", "6", "--big-n", "2",
                           "--concurrency", "2", "--warm-up", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    runs = {run["run"]: run for run in figures["runs"]}
    assert set(runs) == {"4 KB, C=2", "200 KB WAV, C=2", next(r for r in runs if r.startswith("4 KB at"))}
    for run in runs.values():
        expected = 2 if run["run"].startswith("200 KB") else 6
        assert (run["sent"], run["accepted"], run["calls"]) == (expected, expected, expected), run
    assert figures["lost"] == 0 and figures["refused"] == 0
    assert "DATA->Originate" in done.stdout and "calls/accepted/sent" in done.stdout

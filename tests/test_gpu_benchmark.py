"""benchmarks/gpu.py --tiny: every stage of the GPU benchmark runs its code path on a CPU with tiny
models and lands in the table with a number; no timing thresholds (CPU timings of tiny models mean nothing).
The `train` stage also leaves a torch.profiler chrome trace of a few diffbase training steps beside the table,
and says where their time went."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "train",
    "klein",
    "generate",
    "dreamo",
    "upscale",
    "dreamfit",
    "tryon",
    "dreamfit_train",
    "kontext",
    "auto",
    "lowmem",
    "compile",
    "fp8",  # on a CPU: int8dq standing in for fp8dq, whose rows say n/a (needs CUDA >= 8.9)
)
RATIOS = (
    "diffbase (cached) / plain diffusers+peft",
    "diffbase uncached / cached",
    "diffbase `generate()` / bare FluxPipeline",
    "DreamFit generation / plain FLUX.1 generation",
    "DreamO generation, 1 reference, exact mode / plain FLUX.1 generation",
)
NUMBER = re.compile(r"^\d+(\.\d+)?\b")


def rows(table: str) -> list[list[str]]:
    """The body rows of the markdown table, as cells (stage, measure, value, goal, result)."""
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines and lines[0].startswith("| stage | measure |"), table
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_tiny_run_reports_every_stage_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = out.read_text()
    assert table.strip() in proc.stdout  # printed as well as written
    assert table.startswith("## CPU (tiny)")
    body = rows(table)
    assert all(len(cells) == 5 for cells in body), body
    errors = [cells for cells in body if cells[4] == "ERROR" or cells[1] == "error"]
    assert not errors, errors
    for stage in STAGES:
        values = [cells[2] for cells in body if cells[0] == stage]
        assert any(NUMBER.match(v) for v in values), (stage, values)
    for measure in RATIOS:
        found = [cells for cells in body if cells[0] == "ratios" and measure in cells[1]]
        assert len(found) == 1, (measure, body)
        _, _, value, goal, result = found[0]
        assert NUMBER.match(value) and goal.startswith("<=") and result in ("PASS", "FAIL"), found[0]
    # the step's FLOPs were counted, and CPU rows say n/a for what only a GPU has
    assert any("FLOPs of one training step" in cells[1] and NUMBER.match(cells[2]) for cells in body)
    assert all(cells[2].startswith("n/a") for cells in body if "MFU" in cells[1] or "peak memory" in cells[1])
    fp8 = [cells for cells in body if cells[0] == "fp8" and "fp8dq" in cells[1] and "stand-in" not in cells[1]]
    assert len(fp8) == 3 and all(cells[2] == "n/a (needs CUDA >= 8.9)" for cells in fp8), fp8
    # the profiled training steps: the trace beside the table, the top ops by self CPU time per step
    trace = tmp_path / "train-trace.json.gz"
    assert any(cells[0] == "train" and cells[2] == str(trace) for cells in body)
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") and e.get("ph") == "X" for e in events)
    times = [cells for cells in body if cells[0] == "train" and cells[1].startswith("where the time goes")]
    assert len(times) == 8 and all(re.match(r"^\d+\.\d+ ms \(\d+\.\d%\)$", cells[2]) for cells in times), times

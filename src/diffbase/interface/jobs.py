"""Training started from the web UI: each job a `diffbase train` subprocess (so the trainer's own locking,
checkpointing and exports apply), one at a time in the order given, the others waiting. Stop sends SIGTERM:
the trainer finishes its step, saves a checkpoint and exits (143); resume runs the same command with
`--resume latest`. Every job's output folder is under the server's own (`runs/<config>-<n>`), its log
beside it (`logs/job-<n>.log`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WAITING, RUNNING, STOPPING, STOPPED, FINISHED, FAILED, CANCELLED = (
    "waiting", "running", "stopping", "stopped (checkpoint saved)", "finished", "failed", "cancelled",
)  # fmt: skip


@dataclass
class Job:
    number: int
    config: str
    overrides: list[str]
    out: Path
    log: Path
    state: str = WAITING
    resume: bool = False
    code: int | None = None
    message: str = ""
    proc: Any = field(default=None, repr=False)
    seen: tuple[Any, int] = field(default=(None, 0), repr=False, compare=False)  # step()'s: (file_key, step)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "diffbase.cli", "train", self.config, *self.overrides,
               f"experiment.output_dir={self.out}", "--quiet"]  # fmt: skip
        return cmd + (["--resume", "latest"] if self.resume else [])

    def row(self) -> list[Any]:
        """The jobs table's row (the Train tab redraws it every 2 s)."""
        return [self.number, Path(self.config).name, self.state, self.step(), self.message, str(self.out)]

    def step(self) -> int:
        """The last logged training step; metrics.jsonl is read again only when it changed (its stat key), so the
        Train tab's timer costs a stat per job, not a read of every job's whole log."""
        from diffbase.training.metrics import read_metrics

        key = file_key(self.out / "metrics.jsonl")
        if key is None:
            return 0
        if key != self.seen[0]:
            rows = read_metrics(self.out / "metrics.jsonl")
            self.seen = key, max((r.get("step", 0) for r in rows if "loss" in r), default=0)
        return self.seen[1]


class Jobs:
    """The queue: submit, stop, resume, and a worker thread that runs one job at a time."""

    def __init__(self, root: Path, cwd: Path | None = None) -> None:
        self.root, self.cwd = root, cwd
        self.jobs: list[Job] = []
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.closed = False
        self.worker = threading.Thread(target=self.work, name="diffbase-train-jobs", daemon=True)
        self.worker.start()

    def submit(self, config: str, overrides: list[str]) -> Job:
        with self.lock:
            number = len(self.jobs) + 1
            stem = Path(config).stem
            job = Job(number, config, overrides, self.root / "runs" / f"{stem}-{number}",
                      self.root / "logs" / f"job-{number}.log")  # fmt: skip
            self.jobs.append(job)
            self.wake.notify_all()
        return job

    def get(self, number: int) -> Job:
        from diffbase.errors import UserError

        with self.lock:
            for job in self.jobs:
                if job.number == number:
                    return job
        raise UserError(f"job: no job {number}")

    def stop(self, number: int) -> str:
        """A running job: SIGTERM (it saves a checkpoint and exits); a waiting one leaves the queue."""
        job = self.get(number)
        with self.lock:
            if job.state == WAITING:
                job.state = CANCELLED
                return f"job {number}: cancelled before it started"
            if job.state == RUNNING and job.proc is not None:
                job.state = STOPPING
                job.proc.send_signal(signal.SIGTERM)
                return f"job {number}: stopping (it saves a checkpoint at the end of its step)"
        return f"job {number}: {job.state}, nothing to stop"

    def resume(self, number: int) -> str:
        """A stopped (or failed) job with a checkpoint continues from it, back in the queue."""
        from diffbase.errors import UserError

        job = self.get(number)
        with self.lock:
            if job.state not in (STOPPED, FAILED):
                raise UserError(f"job {number}: {job.state}; only a stopped or failed job resumes")
            if not has_checkpoint(job.out):
                raise UserError(f"job {number}: no checkpoint in {job.out / 'checkpoints'} to resume from")
            job.state, job.resume, job.code, job.message = WAITING, True, None, ""
            self.wake.notify_all()
        return f"job {number}: waiting to resume from its latest checkpoint"

    def rows(self) -> list[list[Any]]:
        with self.lock:
            jobs = list(self.jobs)
        return [job.row() for job in jobs]

    def work(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not any(j.state == WAITING for j in self.jobs):
                    self.wake.wait()
                if self.closed:
                    return
                job = next(j for j in self.jobs if j.state == WAITING)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                with open(job.log, "a") as log:
                    job.proc = subprocess.Popen(job.command(), cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)  # fmt: skip
                job.state = RUNNING
            code = job.proc.wait()
            with self.lock:
                job.code, job.proc = code, None
                if code == 0:
                    job.state, job.message = FINISHED, "exports: " + (", ".join(exports(job.out)) or "none")
                elif job.state == STOPPING or code in (130, 143, -signal.SIGTERM):
                    if has_checkpoint(job.out):
                        job.state, job.message = STOPPED, "resume continues from the latest checkpoint"
                    else:
                        job.state, job.message = CANCELLED, "stopped before its first checkpoint"
                else:
                    job.state, job.message = FAILED, last_error(job.log)

    def wait(self, number: int, states: tuple[str, ...], seconds: float) -> Job:
        """Until job `number` is in one of `states` (tests and scripts)."""
        import time

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            job = self.get(number)
            if job.state in states:
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {number}: still {self.get(number).state} after {seconds:g} s")

    def close(self) -> None:
        """The server ends: a running job is stopped (it saves a checkpoint), the worker ends."""
        with self.lock:
            self.closed = True
            running = [j for j in self.jobs if j.proc is not None]
            self.wake.notify_all()
        for job in running:
            job.proc.send_signal(signal.SIGTERM)
        for job in running:
            try:
                job.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                job.proc.kill()


def file_key(path: Path) -> tuple[str, int, int] | None:
    """(path, mtime_ns, size), None while it is missing: it changes whenever the file is written (a folder's,
    whenever an entry is added or renamed), so what is read or drawn from it is redone only then."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path), stat.st_mtime_ns, stat.st_size


def view_key(job: Job) -> tuple[Any, ...]:
    """What the Train tab shows of a job is drawn from: its number and state, its metrics.jsonl, its validation
    folder (a grid can be written without a metrics row) and its log. Equal keys: the page's view is current."""
    return (job.number, job.state, file_key(job.out / "metrics.jsonl"), file_key(job.out / "validation"),
            file_key(job.log))  # fmt: skip


def has_checkpoint(out: Path) -> bool:
    """A run folder holds a checkpoint its resume would find (the trainer's own listing)."""
    from diffbase.training.checkpoint import list_checkpoints

    return bool(list_checkpoints(out / "checkpoints"))


def exports(out: Path) -> list[str]:
    """A finished run's exports as lines (name: path)."""
    return [f"{k}: {v}" for k, v in export_paths(out).items()]


def export_paths(out: Path) -> dict[str, str]:
    """A finished run's exports (name -> path, from its exports.json; none while it has none or a broken one)."""
    import json

    path = out / "exports.json"
    try:
        return dict(json.loads(path.read_text())) if path.is_file() else {}
    except ValueError:
        return {}


def last_error(log: Path) -> str:
    """The trainer's one-line error (`error: ...`), else the log's last line."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
    except OSError:
        return "failed"
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or ["failed"])[-1][:300]

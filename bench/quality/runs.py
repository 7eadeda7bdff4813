"""The runs file of bench/quality: one JSON record per run, appended as each run ends, and the
claims that let several drivers (lanes, one per core) share it without running a spec twice.

Each run is ``glue.py one SPEC`` in its own process (its peak RSS is its own); a claim is a file
holding the driver's pid, taken with O_EXCL and released when the run ends, so a driver that dies
leaves a claim the next one takes over. Claims are named by ``run_key``: after a change of the key,
stop every driver before starting one on the new code.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GLUE = Path(__file__).with_name("glue.py")


def run_key(spec: dict) -> str:
    """What identifies a run: its label, and for IGU-LoRA the knobs it computes with (a record
    without them matches no spec, so it is run again)."""
    keys = ("task", "method", "lr", "seed", "variant") + (("budget",) if "budget" in spec else ())
    keys += ("igu_config",) if spec.get("igu_config") else ()
    return json.dumps({k: spec[k] for k in keys}, sort_keys=True)


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _claim_path(spec: dict, path: Path) -> Path:
    return path.with_suffix(".claims") / (hashlib.sha1(run_key(spec).encode()).hexdigest()[:16] + ".pid")


def _held(claim: Path) -> bool:
    """Whether a live driver holds ``claim`` (the file holds its pid)."""
    try:
        os.kill(int(claim.read_text() or 0), 0)
        return True
    except (ProcessLookupError, ValueError, FileNotFoundError):
        return False


def claimed(spec: dict, path: Path) -> bool:
    """Whether a live driver runs ``spec`` now."""
    return _held(_claim_path(spec, path))


def _claim(spec: dict, path: Path) -> Path | None:
    """Claim ``spec`` for this driver; None if a live driver holds it. Several drivers (lanes, one
    per core) then share one runs file without running a spec twice."""
    claim = _claim_path(spec, path)
    claim.parent.mkdir(exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _held(claim):
                return None
            claim.unlink(missing_ok=True)  # its driver died
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return claim
    return None


def run_spec(spec: dict, path: Path, label: str = "", script: Path = GLUE) -> None:
    """Run ``spec`` in a subprocess (``script one SPEC``: glue.py's, or decoder.py's) and append its
    record to ``path`` (unless it is recorded or another driver runs it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if run_key(spec) in {run_key(r) for r in load_runs(path)}:
        return
    claim = _claim(spec, path)
    if claim is None:
        return
    try:
        print(f"{label}{run_key(spec)}", flush=True)
        started = time.time()
        out = subprocess.run(
            [sys.executable, str(script), "one", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"run {run_key(spec)} failed:\n{out.stderr[-3000:]}")
        record = json.loads(out.stdout.strip().splitlines()[-1])
        if run_key(record) != run_key(spec):  # it would never count as done: the sweep would loop
            raise RuntimeError(f"run {run_key(spec)} recorded itself as {run_key(record)}")
        record["wall_s"] = round(time.time() - started, 1)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        # a task without val (the decoder's RTE) has dev alone
        scores = [f"{k} {record[f'{k}_accuracy']:.4f}" for k in ("val", "dev") if f"{k}_accuracy" in record]
        print(f"    {' '.join(scores)} ({record['wall_s']} s)")
    finally:
        claim.unlink(missing_ok=True)


def ensure(specs: list[dict], path: Path, script: Path = GLUE) -> list[dict]:
    """Run the specs not yet recorded in ``path`` (one subprocess each); return all their records.
    The file is re-read before each run, so two drivers can share it (two lanes on two cores)."""
    for number, one in enumerate(specs, 1):
        run_spec(one, path, f"[{number}/{len(specs)}] ", script)
    done = {run_key(r): r for r in load_runs(path)}
    return [done[run_key(s)] for s in specs if run_key(s) in done]

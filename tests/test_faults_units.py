"""Units of the fault handling (no ranks): the manifest's checks on real files, the non-finite step
counter, the step watchdog's thread, exit codes. The faults themselves are injected into real ranks in
tests/test_faults_dist.py."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trainer import manifest
from trainer.faults import EXIT_HUNG, EXIT_NONFINITE, NonFinite, Watchdog, exit_code

ROOT = Path(__file__).resolve().parents[1]


def _files(folder, sizes):
    for name, n in sizes.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(bytes(range(256)) * (n // 256) + b"x" * (n % 256))
    return manifest.sizes(folder)


def test_the_manifest_finds_a_flipped_byte_a_cut_file_and_a_missing_one(tmp_path):
    listing = _files(tmp_path, {"a.pt": 5000, "b.pt": 70000, "sub/c.pt": 10})
    (tmp_path / "COMPLETE").write_text("{}")  # records are not hashed
    assert listing == {"a.pt": 5000, "b.pt": 70000, "sub/c.pt": 10}
    entries = manifest.describe(tmp_path, sorted(listing))
    assert manifest.problems(tmp_path, entries) == []
    data = bytearray((tmp_path / "b.pt").read_bytes())
    data[40000] ^= 1  # same size, one bit: only the checksum can see it
    (tmp_path / "b.pt").write_bytes(bytes(data))
    with open(tmp_path / "a.pt", "r+b") as f:
        f.truncate(2500)
    (tmp_path / "sub" / "c.pt").unlink()
    found = manifest.problems(tmp_path, entries)
    assert found[0] == "a.pt has 2500 bytes, the manifest says 5000"
    assert found[1].startswith("b.pt has other bytes than were saved (xxh3_64 ")
    assert found[2] == "sub/c.pt is missing"


def test_checksum_shares_balance_bytes_and_cover_every_file_once():
    files = {f"f{i}": size for i, size in enumerate([900, 100, 500, 500, 300, 200, 50])}
    shares = manifest.shares(files, 3)
    assert sorted(n for s in shares for n in s) == sorted(files)
    loads = [sum(files[n] for n in s) for s in shares]
    assert max(loads) - min(loads) <= 100, loads
    assert manifest.shares(files, 3) == shares  # the same on every rank


class _Engine:
    def __init__(self, fp16=False):
        self._fp16 = fp16

    def fp16_enabled(self):
        return self._fp16


def test_nonfinite_counts_in_a_row_and_stops_at_the_limit():
    nf = NonFinite(_Engine(), "stop", 2, total=1, start_step=4)
    assert not nf.count(5, 1.0, applied=True) and nf.last_good == 5
    assert nf.count(6, math.nan, applied=False) and not nf.stop
    assert nf.count(7, 1.0, applied=False) and nf.stop and nf.total == 3  # not applied (an inf norm) counts
    assert "steps 6-7 had a non-finite loss" in nf.stop_message(7, "CKPT")
    assert "none of them was applied, so checkpoint CKPT holds the weights and optimizer state after step 5" in \
        nf.stop_message(7, "CKPT")
    skip = NonFinite(_Engine(), "skip", 1)
    assert skip.count(1, math.nan, applied=True) and not skip.stop
    assert "its gradients were finite, so its update was applied" in skip.skipped_note(1, math.nan, 0.5)
    assert not skip.count(2, 1.0, applied=True) and skip.in_a_row == 0


def test_fp16_overflow_with_a_finite_loss_is_the_loss_scaler_at_work_not_a_bad_step():
    nf = NonFinite(_Engine(fp16=True), "stop", 1)
    assert not nf.count(1, 2.0, applied=False) and not nf.stop
    assert nf.count(2, math.inf, applied=False) and nf.stop


def test_the_watchdog_fires_once_for_a_step_that_outlives_the_timeout(capfd):
    fired = []
    done = threading.Event()

    def exit_(code):
        fired.append(code)
        done.set()

    w = Watchdog(0.3, rank=1, grace_s=0, exit=exit_)
    w.arm(1)
    w.disarm()  # a step that finished in time
    time.sleep(0.5)
    assert fired == []
    w.arm(7)
    assert done.wait(5)
    assert fired == [EXIT_HUNG]
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert lines[0].startswith("[rank 1] error: rank 1 ") and all(line.startswith("[rank 1] ") for line in lines)
    assert "step 7 has not finished after 0.3 s (dist.step_timeout_s = 0.3)" in lines[0]
    assert "Thread step-watchdog (most recent call last):" in err  # every thread's stack, by thread name...
    assert any(line.endswith(", in test_the_watchdog_fires_once_for_a_step_that_outlives_the_timeout")
               for line in lines)  # ...this test's (the main thread's) among them
    w.close()


def test_a_zero_timeout_starts_no_thread():
    before = threading.active_count()
    w = Watchdog(0, rank=0)
    w.arm(1)
    assert threading.active_count() == before
    w.close()


@pytest.mark.parametrize("status,code", [("done", 0), ("already_done", 0), ("preempted", 0), ("crashed", 1),
                                         ("nonfinite", EXIT_NONFINITE)])
def test_exit_codes(status, code):
    assert exit_code(status) == code


def test_tidy_puts_back_a_replaced_checkpoint_and_removes_partial_ones(tmp_path, capsys):
    from trainer.checkpoint import _tidy, complete_tags

    def folder(name, complete):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.pt").write_text(name)
        if complete:
            (tmp_path / name / "COMPLETE").write_text("{}")

    folder("step00000002", True)
    folder("step00000004.old", True)  # being replaced when a crash came: the new step 4 never completed
    folder("step00000004", False)
    folder("step00000006", True)
    folder("step00000006.old", True)  # the new step 6 completed: the old copy goes
    folder("step00000008", False)  # a killed save
    folder("step00000003.damaged", False)
    assert _tidy(tmp_path) == ["step00000002", "step00000004", "step00000006"]
    assert (tmp_path / "step00000004" / "f.pt").read_text() == "step00000004.old"  # the complete copy is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000002", "step00000003.damaged", "step00000004",
                                                          "step00000006"]
    assert "removed " + str(tmp_path / "step00000008") in capsys.readouterr().out
    folder("step00000010.old", True)  # names that are not exactly a tag never count as checkpoints
    assert complete_tags(tmp_path) == ["step00000002", "step00000004", "step00000006"]


def test_reports_written_at_once_by_several_ranks_into_one_log_do_not_interleave(tmp_path):
    """Every rank of a hung step reports at the same moment into the job's one log: a regular file
    (torchrun here) or a pipe (srun). Each report is written whole lines at a time in writes of at most
    PIPE_BUF bytes, so no rank's line is cut by another's (faulthandler's piecewise writes were), even
    for reports larger than a pipe's atomic write."""
    script = ("import sys; from trainer.faults import write_report\n"
              "r = int(sys.argv[1])\n"
              "for i in range(300): write_report(r, '\\n'.join(f'line {j} of report {i} ' + 'x' * 140 for j in range(40)))\n")
    pattern = re.compile(r"\[rank [0-3]\] line \d+ of report \d+ x{140}")
    for kind in ("file", "pipe"):
        if kind == "file":
            with open(tmp_path / "log", "w") as f:
                procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], cwd=ROOT, stderr=f) for r in range(4)]
                assert [p.wait(timeout=60) for p in procs] == [0] * 4
            lines = (tmp_path / "log").read_text().splitlines()
        else:
            read_end, write_end = os.pipe()
            procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], cwd=ROOT, stderr=write_end)
                     for r in range(4)]
            os.close(write_end)
            with os.fdopen(read_end, "rb") as pipe:
                lines = pipe.read().decode().splitlines()
            assert [p.wait(timeout=60) for p in procs] == [0] * 4
        assert len(lines) == 4 * 300 * 40 and len(lines[0]) * 40 > 4096, kind  # reports above PIPE_BUF
        assert all(pattern.fullmatch(line) for line in lines), (kind, [x for x in lines if not pattern.fullmatch(x)][:3])
        # and each rank's lines of a report come in its order
        for r in range(4):
            mine = [x for x in lines if x.startswith(f"[rank {r}] ")]
            assert mine == [f"[rank {r}] line {j} of report {i} " + "x" * 140 for i in range(300) for j in range(40)]


def test_starting_over_sets_each_earlier_attempt_aside_whole_and_keeps_the_runs_own_files(tmp_path):
    from launcher.rundir import RunDir
    from trainer.start_over import set_aside

    run = RunDir(tmp_path)
    for name in ("config.yaml", "jobs.jsonl", "metrics.jsonl", "loss_curve.png"):
        (tmp_path / name).write_text(name)
    for folder in ("checkpoints/step00000004", "tb", "eval/step00000004", "export"):
        (tmp_path / folder).mkdir(parents=True)
    assert set_aside(run) == run.previous(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "jobs.jsonl", "previous-1"]  # the run's own
    assert sorted(p.name for p in run.previous(1).iterdir()) == [
        "checkpoints", "eval", "export", "loss_curve.png", "metrics.jsonl", "tb"]
    assert (run.previous(1) / "checkpoints" / "step00000004").is_dir()
    assert set_aside(run) is None  # nothing of an attempt there: nothing moves
    (tmp_path / "metrics.jsonl").write_text("second attempt")
    assert set_aside(run) == run.previous(2) and (run.previous(2) / "metrics.jsonl").read_text() == "second attempt"
    assert (run.previous(1) / "metrics.jsonl").read_text() == "metrics.jsonl"  # an earlier set-aside is never touched


def test_a_stop_written_for_this_attempt_survives_the_start_and_an_earlier_ones_does_not(tmp_path):
    from launcher.rundir import STOP_KEY_ENV
    from trainer.stop import clear_stale

    stop, mine = tmp_path / "STOP", {STOP_KEY_ENV: "77_1.0"}  # array task 77_1, restart 0
    stop.write_text("77_1.0\n")  # the batch script's signal trap, while the ranks were starting
    assert clear_stale(stop, mine) and stop.exists()
    assert not clear_stale(stop, {STOP_KEY_ENV: "77_1.1"}) and not stop.exists()  # the requeued attempt
    stop.write_text("")  # `touch RUN_DIR/STOP` before this start (a stopped local run being resumed)
    assert not clear_stale(stop, mine) and not stop.exists()
    stop.write_text("77_1.0\n")
    assert not clear_stale(stop, {}) and not stop.exists()  # not started by the batch script
    assert not clear_stale(stop, mine)  # no STOP at all

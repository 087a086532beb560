"""``crossdistil train --world-size N --max-restarts R`` restarts the ranks after a transient failure only
(``consumers.trainer.command.launch_ranks``): a status a restart would repeat (2, 5, 7, 10: ``NOT_RESTARTED``, the
systemd unit's RestartPreventExitStatus) ends the command at once with that status, whatever R.

torchrun's own agent restarts the group after any failure (``SimpleElasticAgent._invoke_run`` looks at the group's
state, never at an exit code), so each attempt runs torchrun with ``--max-restarts 0`` and the command decides. The
tests with the real launcher (sh workers, no Python in them) fail if torch changes that contract under it: a
failed attempt must end in ``ChildFailedError`` carrying each rank's exit code, after one start of the workers.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch.distributed.run as torch_run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from consumers.trainer import command
from consumers.trainer.command import NOT_RESTARTED, launch_ranks

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[4]
TORCHRUN_ARGS = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "-m", "consumers.cli", "train"]


class FakeTorchrun:
    """``torch.distributed.run.run`` that fails each attempt with the next ranks' exit codes ({rank: code}, in the
    order they exited; None: the attempt succeeds) and records the ``max_restarts`` it was given."""

    def __init__(self, *attempts: dict[int, int] | None) -> None:
        self.attempts = list(attempts)
        self.max_restarts: list[int] = []

    def __call__(self, args: Any) -> None:
        self.max_restarts.append(args.max_restarts)
        codes = self.attempts.pop(0)
        if codes is None:
            return
        failures = {}
        for order, (rank, code) in enumerate(codes.items()):
            failures[rank] = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="")
            failures[rank].timestamp = 100 + order
        raise ChildFailedError(name="consumers.cli", failures=failures)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    def install(*attempts: dict[int, int] | None) -> FakeTorchrun:
        run = FakeTorchrun(*attempts)
        monkeypatch.setattr(torch_run, "run", run)
        return run
    return install


@pytest.mark.parametrize("status", sorted(NOT_RESTARTED))
def test_a_status_a_restart_would_repeat_ends_the_command_with_it_at_once(fake, capsys, status: int) -> None:
    run = fake({0: status, 1: status})
    assert launch_ranks(TORCHRUN_ARGS) == status
    assert run.max_restarts == [0]  # torchrun itself would have restarted it
    err = capsys.readouterr().err
    assert f"rank 0 exited with status {status} ({NOT_RESTARTED[status]}): the group is not restarted" in err


@pytest.mark.parametrize(("code", "status"), [(8, 8), (9, 9), (-9, 1)])
def test_a_transient_failure_is_restarted_max_restarts_times_then_ends_with_its_status(
        fake, capsys, code: int, status: int) -> None:
    run = fake({1: code, 0: 8}, {1: code, 0: 8}, {1: code, 0: 8})
    assert launch_ranks(TORCHRUN_ARGS) == status
    assert run.max_restarts == [0, 0, 0]  # the first start and R = 2 restarts
    err = capsys.readouterr().err
    assert err.count("restarting the group") == 2 and "(2 of 2 restarts)" in err
    assert f"rank 1 {command.exit_said(code)} after 2 of 2 restarts (--max-restarts): giving up" in err


def test_a_group_restarted_after_a_transient_failure_that_then_finishes_ends_with_0(fake, capsys) -> None:
    run = fake({1: -9, 0: 8}, None)
    assert launch_ranks(TORCHRUN_ARGS) == 0
    assert len(run.max_restarts) == 2
    assert "rank 1 was killed by signal 9 (SIGKILL): restarting the group (1 of 2 restarts)" in capsys.readouterr().err


def test_a_status_a_restart_would_repeat_on_any_rank_wins_over_an_earlier_lost_rank(fake, capsys) -> None:
    """Rank 1 lost rank 0 (8) before torchrun saw rank 0's 2: a configuration error of one rank only."""
    run = fake({1: 8, 0: 2})
    assert launch_ranks(TORCHRUN_ARGS) == 2
    assert len(run.max_restarts) == 1
    assert "rank 0 exited with status 2 (a configuration error)" in capsys.readouterr().err


def test_a_restarted_group_that_then_fails_for_good_ends_with_that_status(fake) -> None:
    """A restart that then fails for good ends the command with that status (10), not the first failure's (8)."""
    run = fake({1: 8, 0: 8}, {0: 10, 1: 10})
    assert launch_ranks(TORCHRUN_ARGS) == 10
    assert len(run.max_restarts) == 2


def test_a_stop_while_the_ranks_start_stops_the_rank_processes_torchs_launcher_had_not_taken_charge_of(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """torch's agent records its ranks' processes only once it has started all of them: a SIGTERM in between raised
    in the agent with none of them recorded, so none was stopped and they ran on without a launcher (the likely
    cause of a node that never ended in a two-node test). The command stops them as the agent would have, and what
    they recorded decides: here the status 9 of a last round that could not be written."""
    import signal
    import subprocess
    import time

    from torch.distributed.elastic.multiprocessing.api import SignalException

    from consumers.runtime.processes import child_pids
    from consumers.runtime.ranks import STATUS_DIR_ENV

    started, ranks = tmp_path / "started", []

    def torchrun(args: Any) -> None:
        script = (f"trap 'echo 9 > \"${STATUS_DIR_ENV}/rank-1\"; exit 9' TERM; touch {shlex.quote(str(started))}; "
                  "while :; do sleep 0.05; done")
        ranks.append(subprocess.Popen(["sh", "-c", script]))
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        raise SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)

    monkeypatch.setattr(torch_run, "run", torchrun)
    bystander = subprocess.Popen(["sleep", "60"])  # another child of this process (as a test's broker would be)
    try:
        assert launch_ranks(TORCHRUN_ARGS, tmp_path / "run") == 9
        assert bystander.poll() is None  # only the attempt's ranks are stopped
    finally:
        bystander.kill()
        bystander.wait()
    said = capsys.readouterr().err
    assert "stopped 1 rank process(es) torch's launcher had not taken charge of yet" in said, said
    assert "rank 1 exited with status 9" in said, said
    assert ranks[0].pid not in child_pids()  # ended and reaped


def test_the_statuses_not_restarted_are_the_systemd_units() -> None:
    unit = (REPO / "deploy" / "systemd" / "crossdistil-trainer.service").read_text()
    prevented = re.search(r"^RestartPreventExitStatus=(.*)$", unit, re.MULTILINE)
    assert prevented is not None
    assert {int(s) for s in prevented.group(1).split()} == set(NOT_RESTARTED)


def sh_ranks(tmp_path: Path, exit_status: int, restarts: int) -> list[str]:
    """torchrun arguments of two sh workers that note each start in ``starts`` and exit ``exit_status``."""
    script = f"echo $RANK >> {shlex.quote(str(tmp_path / 'starts'))}; exit {exit_status}"
    return ["--standalone", "--nproc-per-node", "2", "--max-restarts", str(restarts), "--monitor-interval", "0.1",
            "--no-python", "sh", "-c", script]


@pytest.mark.parametrize("status", [10, 2])
def test_torchruns_launcher_starts_ranks_that_exit_with_a_permanent_status_once(tmp_path: Path, status: int) -> None:
    assert launch_ranks(sh_ranks(tmp_path, status, restarts=2)) == status
    assert sorted((tmp_path / "starts").read_text().split()) == ["0", "1"]


def test_torchruns_launcher_starts_ranks_that_exit_9_once_and_max_restarts_times_more(tmp_path: Path) -> None:
    assert launch_ranks(sh_ranks(tmp_path, 9, restarts=2)) == 9
    assert sorted((tmp_path / "starts").read_text().split()) == ["0", "0", "0", "1", "1", "1"]

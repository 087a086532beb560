"""``crossdistil train``: its flags and exit statuses; the daemon itself is ``consumers.trainer.daemon``.

Exit status: 0 after a stop (SIGTERM or SIGINT, also one while it starts or connects) or the end of a finite
stream; 2 for a configuration error, a flag out of range, a checkpoint or ledger folder that cannot be made (or a
checkpoint directory written by something else, by a newer version, held by another running trainer, or holding
only damaged checkpoints: never a silent start from scratch; a checkpoint of a structurally different model, or a
``checkpoint.warm_start`` / ``--warm-start`` source that is no usable checkpoint of the deep model), a metrics port
that cannot be bound, or a serving topic whose max.message.bytes is below a publication's messages; 3 when Kafka
cannot be reached at start; 4 when no partition was assigned for ``kafka.stall_exit_s``; 5 when another trainer with the
same ``group_instance_id`` took the partitions over; 6 when the learner process failed or died; 7 when a record
batch cannot be decoded (a codec that is not installed, a corrupt batch: its topic, partition and offset are
named); 8 when a rank of several lost the other ranks (one died or could not be reached: the group is
restarted); 9 when the last checkpoint could not be written (a full disk, dead letters Kafka never acknowledged:
the previous one is intact and a restart resumes from it); 10 when the model diverged (NaN or infinite weights: never
checkpointed nor published; lower ``model.options.lr`` before a restart resumes from the last good checkpoint)
(``consumers.trainer.daemon`` and ``consumers.trainer.ranked`` say why each).

Several ranks: under torchrun (``RANK``/``WORLD_SIZE`` set) each process is one rank
(``consumers.trainer.ranked``); ``--world-size N`` starts torchrun with N ranks on this machine (or N/M on each of
``--nnodes M`` machines, one command per machine with its ``--node-rank``) and restarts the group (``--max-restarts
R`` times at most) after a transient failure only: not after 2, 5, 7 or 10 (``NOT_RESTARTED``, as the systemd unit),
which the command then exits with at once (``launch_ranks``; on several machines every node's command alike). A stop
exits 0, or the status the ranks recorded for their last round (9: it could not be written).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from consumers.runtime import logs
from consumers.runtime.config import (
    WARM_START_RANKS_RESUME,
    Config,
    ConfigError,
    add_config_arguments,
    kafka_client_options,
    load_config,
    to_toml,
)
from consumers.runtime.paths import check_output_folder
from consumers.runtime.processes import stop_children
from consumers.runtime.timeparse import parse_time
from consumers.trainer.exits import EXIT_CHECKPOINT_FAILED, EXIT_MODEL_DIVERGED, EXIT_RANKS

# Exit statuses after which a restart would fail the same way: the systemd unit's RestartPreventExitStatus, and the
# statuses after which --world-size does not restart the ranks (launch_ranks).
NOT_RESTARTED = {2: "a configuration error", 5: "another trainer took the partitions over",
                 7: "a record batch that cannot be decoded", EXIT_MODEL_DIVERGED: "the model diverged"}
# Why the ranks' last round after a stop ended with a status other than 0.
STOP_FAILED = {EXIT_CHECKPOINT_FAILED: "its last round could not be written", EXIT_MODEL_DIVERGED: "the model diverged"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``crossdistil train``."""
    add_config_arguments(parser, "deploy/trainer.example.toml", "batching.batch_size=512")
    parser.add_argument("--device", help="torch device, overrides model.device (auto, cpu, cuda, cuda:1)")
    parser.add_argument("--exit-when-idle", type=float, metavar="SECONDS", default=None,
                        help="finite streams: when no event arrived for SECONDS and every partition is at its end "
                             "offset, flush the join and the batcher, checkpoint, publish and exit 0")
    parser.add_argument("--ledger", metavar="DIR", default=None,
                        help="write a trained-sample ledger (impression ids, labels, predictions) next to the "
                             "checkpoints, made durable with them (audits, exactly-once tests)")
    parser.add_argument("--from-time", metavar="TIME", default=None,
                        help="a trainer without a checkpoint position for a partition starts it at the first record "
                             "stamped at or after TIME (unix ms or ISO 8601, e.g. 2026-11-01T00:00Z) instead of its "
                             "beginning; positions in the checkpoint always win, so restarts stay exactly-once")
    parser.add_argument("--warm-start", metavar="PATH", default=None,
                        help="a new model (checkpoint.dir holds no checkpoint yet) starts from the weights of the "
                             "checkpoint file PATH, or of the newest verified checkpoint in folder PATH, wherever they "
                             "still fit: a structural change of [model] (a task or a feature added, another "
                             "backbone); sets checkpoint.warm_start, and checkpoint.warm_start_stream says where the "
                             "topics are read from (docs/operations.md)")
    parser.add_argument("--torch-threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads on CPU (default, or 0: torch's choice, one per core). On a shared "
                             "or busy machine 1 is often much faster: idle threads spin while waiting for cores")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="run N trainer ranks of one model: on this machine (torchrun's launcher, --standalone "
                             "--nproc-per-node N), or N in all on --nnodes machines (docs/scaling.md)")
    parser.add_argument("--max-restarts", type=int, default=3, metavar="R",
                        help="with --world-size: how often the ranks are restarted after one failed (default 3); never "
                             "after a status a restart would repeat: 2, 5, 7, 10 (the command exits with it at once)")
    parser.add_argument("--nnodes", type=int, default=1, metavar="M",
                        help="with --world-size N: the ranks run on M machines, N/M on each; run the same command "
                             "on each machine with its own --node-rank (default 1: this machine only)")
    parser.add_argument("--node-rank", type=int, default=0, metavar="K",
                        help="with --nnodes: this machine's index, 0 to M-1; it runs ranks K*N/M to (K+1)*N/M-1 and "
                             "node 0 hosts the rendezvous and decides the group's restarts")
    parser.add_argument("--master-addr", metavar="HOST", default=None,
                        help="with --nnodes: node 0's address, which every node can reach")
    parser.add_argument("--master-port", type=int, default=29500, metavar="P",
                        help="with --nnodes: the port node 0 serves the rendezvous on (default 29500)")
    parser.add_argument("--exit-on-stop", type=int, default=0, metavar="STATUS",
                        help="with --world-size: a stop (SIGTERM, SIGINT) whose ranks checkpointed their last round "
                             "ends the command with STATUS instead of 0 (11 to 125), so that a supervisor that takes "
                             "0 for done starts it again: a Kubernetes Job's pod after a preemption or an eviction "
                             "(deploy/k8s-ranks; docs/scaling.md)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=logs.LEVELS,
                        help="logging level: DEBUG, INFO (default), WARNING or ERROR")


# How long ranks stopped by the launcher get to checkpoint their last round before SIGKILL (torch's agent's default;
# torchrun's --shutdown-timeout where given)
SHUTDOWN_TIMEOUT_S = 30.0
RENDEZVOUS_TIMEOUT_S = 600.0  # torch's static rendezvous's default: a machine may take minutes to (re)start
# The launcher's flags: the ranks' command line does not carry them.
LAUNCHER_FLAGS = ("--world-size", "--max-restarts", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                  "--exit-on-stop")


def torchrun_command(argv: list[str], world_size: int, max_restarts: int, nnodes: int = 1, node_rank: int = 0,
                     master: str = "", timeout_s: float = RENDEZVOUS_TIMEOUT_S) -> list[str]:
    """The torchrun command line that ``crossdistil train --world-size N ...`` becomes: the same flags, less the
    launcher's (``LAUNCHER_FLAGS``), run as N ranks on this machine, or as N/M ranks of node ``node_rank`` of
    ``nnodes`` M with a static rendezvous at ``master`` (``HOST:PORT``), where a node waits up to ``timeout_s`` for
    the others; ``--max-restarts R`` is applied by :func:`launch_ranks`, which restarts the group only after a
    transient failure.

    >>> torchrun_command(["--config", "t.toml", "--world-size", "2", "--ledger=L"], 2, 3)[3:]
    ['--standalone', '--nproc-per-node', '2', '--max-restarts', '3', '-m', 'consumers.cli', 'train', '--config', \
't.toml', '--ledger=L']
    >>> torchrun_command(["--world-size=4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "a"], 4, 3, 2, 1,
    ...                  "a:29500")[3:13]
    ['--nnodes', '2', '--node-rank', '1', '--nproc-per-node', '2', '--master-addr', 'a', '--master-port', '29500']
    """
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCHER_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in LAUNCHER_FLAGS)):
            rest.append(arg)
    if nnodes > 1:
        host, _, port = master.rpartition(":")
        where = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc-per-node",
                 str(world_size // nnodes), "--master-addr", host, "--master-port", port, "--rdzv-backend", "static",
                 "--rdzv-conf", f"timeout={timeout_s:g}"]
    else:
        where = ["--standalone", "--nproc-per-node", str(world_size)]
    return [sys.executable, "-m", "torch.distributed.run", *where, "--max-restarts", str(max_restarts),
            "-m", "consumers.cli", "train", *rest]


def launch_ranks(torchrun_args: list[str], run_dir: Path | None = None, exit_on_stop: int = 0) -> int:
    """torchrun's launcher in this process (``torch.distributed.run``), its ``--max-restarts R`` applied here: each
    attempt runs torchrun with ``--max-restarts 0`` (its agent restarts the group after any failure, whatever the
    status), and a failed attempt is started again, up to R times, only when its status is not one of
    ``NOT_RESTARTED`` (a restart would fail the same way): :func:`group_decision`. A stop (SIGTERM, SIGINT)
    reaches the ranks, which checkpoint a last round and exit: status ``exit_on_stop`` (0, as one trainer's, unless
    ``--exit-on-stop`` says otherwise), or the status they recorded (9: that last round could not be written). A
    failure not restarted: the ranks' exit status.

    ``run_dir``: this node's launcher folder (``checkpoint.dir/launcher/node-<K>``; None: a temporary one), which
    holds the ranks' recorded statuses and torchrun's logs (unless ``--log-dir`` names a folder for them), and goes
    when the command ends; what a command killed with SIGKILL left there goes when the next one starts
    (``consumers.runtime.ranks.launcher_folder``).

    Several machines (``--nnodes M``, static rendezvous at ``--master-addr``): every node's command runs this, and
    the nodes decide together (``consumers.runtime.ranks.NodeGroup``): node 0 decides from every node's outcome,
    waiting for each as long as for the rendezvous (``--rdzv-conf timeout=S``, torch's default 600 s), and all
    restart together or all end with the same status."""
    # lazy: torch.distributed loads only when ranks run (crossdistil --help stays fast)
    from consumers.runtime.ranks import LauncherFolderInUse, launcher_folder

    try:
        with launcher_folder(run_dir) as folder:
            status, stopped = _launch(torchrun_args, folder)
    except LauncherFolderInUse as exc:
        print(f"crossdistil train: {exc}", file=sys.stderr, flush=True)
        return 2
    if stopped and status == 0 and exit_on_stop:
        print(f"crossdistil train: exiting with status {exit_on_stop} after the stop (--exit-on-stop)",
              file=sys.stderr, flush=True)
        return exit_on_stop
    return status


def _launch(torchrun_args: list[str], run_dir: Path) -> tuple[int, bool]:
    """The attempts of :func:`launch_ranks`, in ``run_dir``: the command's exit status, and whether a stop ended
    them."""
    # lazy: torch's launcher loads only when ranks run (crossdistil --help stays fast)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import parse_args

    from consumers.runtime.ranks import STATUS_DIR_ENV

    args = parse_args(torchrun_args)
    restarts, group = args.max_restarts, None
    restarted, generation = 0, None
    try:
        group = node_group(args)
        while True:
            generation = group.begin(generation) if group is not None else (generation or 0)
            attempt = parse_args(torchrun_args)
            attempt.max_restarts = 0  # restarts are decided below, by exit status
            if attempt.log_dir is None:  # torchrun's default: a new /tmp/torchelastic_* folder per attempt, kept
                attempt.log_dir = str(run_dir / "logs")
            if group is not None:
                attempt.rdzv_id = f"crossdistil-{generation}"  # no attempt reads another's keys
            statuses = run_dir / f"attempt-{generation}"
            statuses.mkdir()
            os.environ[STATUS_DIR_ENV] = str(statuses)  # the ranks inherit it
            outcome = run_attempt(attempt, statuses, group)
            decide = functools.partial(group_decision, restarted=restarted, restarts=restarts)
            decision = decide([outcome]) if group is None else group.settle(generation, outcome, decide)
            print(decision["said"], file=sys.stderr, flush=True)
            if not decision["restart"]:
                return int(decision["status"]), bool(decision.get("stopped"))
            restarted, generation = int(decision["restarted"]), generation + 1
    except SignalException as exc:  # between two attempts: no rank runs
        print(f"crossdistil train: {exc}: stopped between two starts of the ranks", file=sys.stderr, flush=True)
        return 0, True
    except RuntimeError as exc:  # the store of node 0's command cannot be reached, or served (c10d's errors)
        print(f"crossdistil train: node {args.node_rank} lost the group's rendezvous at {args.master_addr}:"
              f"{args.master_port} ({exc}): exiting with status {EXIT_RANKS}; started again, the command joins "
              "the group's next start", file=sys.stderr, flush=True)
        return EXIT_RANKS, False
    finally:
        os.environ.pop(STATUS_DIR_ENV, None)


def node_group(args: argparse.Namespace) -> Any:
    """The ``NodeGroup`` of torchrun arguments ``args`` on several nodes (static rendezvous), None on one machine;
    a node waits for the others as long as at torch's static rendezvous (``--rdzv-conf timeout=S``, 600 s)."""
    nnodes = str(args.nnodes)
    if args.standalone or nnodes in ("1", "1:1"):
        return None
    # lazy: torch's launcher and torch.distributed load only when ranks run (crossdistil --help stays fast)
    from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config

    from consumers.runtime.ranks import NodeGroup

    timeout_s = float(_parse_rendezvous_config(args.rdzv_conf).get("timeout", RENDEZVOUS_TIMEOUT_S))
    return NodeGroup(args.master_addr, int(args.master_port), int(nnodes.split(":")[-1]), args.node_rank, timeout_s)


def run_attempt(attempt: argparse.Namespace, statuses: Path, group: Any) -> dict[str, Any]:
    """One start of the ranks by torchrun's launcher; this node's outcome: ``failures`` ``{rank: [time, exit
    code]}`` (a negative code: a signal) and ``stopped`` (the signal that stopped the command, or "")."""
    # lazy: torch's launcher loads only when ranks run (crossdistil --help stays fast)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import run as torchrun

    from consumers.runtime.ranks import STATUS_DIR_ENV, recorded_exit_statuses

    try:
        torchrun(attempt)
        return {"failures": {}, "stopped": ""}
    except ChildFailedError as exc:
        return {"failures": {str(r): [f.timestamp, f.exitcode] for r, f in exc.failures.items()}, "stopped": ""}
    except SignalException as exc:
        # A stop while torch's agent was starting the ranks: it records their processes only once all are started,
        # so it stopped none of them; they would run on without a launcher. Stop them as it would have: this
        # attempt's ranks, the children started with its status folder (nothing else this process may have started).
        leftover = stop_children(exc.sigval, float(getattr(attempt, "shutdown_timeout", None) or SHUTDOWN_TIMEOUT_S),
                                 environ=(STATUS_DIR_ENV, str(statuses)))
        if leftover:
            print(f"crossdistil train: the stop came while the ranks were starting: stopped {len(leftover)} rank "
                  f"process(es) torch's launcher had not taken charge of yet", file=sys.stderr, flush=True)
        # torch's agent stopped the ranks without keeping their statuses: the ones they recorded say how it went
        recorded = recorded_exit_statuses(statuses)
        if group is not None:
            check_in_stopped(attempt, group)
        return {"failures": {str(r): [t, s] for r, (t, s) in recorded.items() if s}, "stopped": str(exc)}
    except (RendezvousError, RuntimeError) as exc:  # the nodes did not meet (a store or rendezvous timeout)
        print(f"crossdistil train: node {attempt.node_rank} could not meet the other nodes at {attempt.master_addr}:"
              f"{attempt.master_port}: {exc}", file=sys.stderr, flush=True)
        first = attempt.node_rank * int(attempt.nproc_per_node)
        return {"failures": {str(first): [time.time(), EXIT_RANKS]}, "stopped": ""}


def check_in_stopped(attempt: argparse.Namespace, group: Any) -> None:
    """Check a stopped node in at torch's exit barrier of the attempt, as its agent would have after a success: the
    other nodes' agents, whose ranks stopped with status 0, wait there (300 s) for every node."""
    # lazy: torch's launcher loads only when ranks run (crossdistil --help stays fast)
    import torch.distributed as dist
    from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
    from torch.distributed.elastic.utils.store import _barrier_nonblocking

    try:
        store = dist.PrefixStore(attempt.rdzv_id, group.root)
        _barrier_nonblocking(store=store, world_size=group.nnodes, key_prefix=_TERMINAL_STATE_SYNC_ID)
    except (RuntimeError, AttributeError) as exc:  # the other nodes then wait out their exit barrier
        print(f"crossdistil train: could not tell the other nodes' launchers that this one stopped: {exc}",
              file=sys.stderr, flush=True)


def group_decision(outcomes: list[dict[str, Any] | None], restarted: int, restarts: int) -> dict[str, Any]:
    """What the group does after an attempt, from each node's outcome (:func:`run_attempt`; None: a node that did not
    report): ``restart`` or not, the ``status`` to exit with, ``restarted`` (restarts made so far), ``stopped``
    (whether a stop ended the group) and ``said`` (the line printed). A stop of any node ends the group: 0, or a
    status the ranks recorded (9: the last round failed). Else a failure of any rank decides
    (:func:`deciding_failure`): restarted while a restart can help and R allows.

    >>> failed = {"failures": {"1": [1.0, 9], "0": [2.0, 8]}, "stopped": ""}
    >>> [group_decision([failed, None], n, 2)["restart"] for n in (0, 2)], group_decision([failed], 2, 2)["status"]
    ([True, False], 9)
    >>> stop = group_decision([{"failures": {}, "stopped": ""}, {"failures": {"1": [1.0, 9]}, "stopped": "SIGTERM"}],
    ...                       0, 2)
    >>> stop["restart"], stop["status"], stop["stopped"], stop["said"].endswith("rank 1 exited with status 9 (its "
    ...                                                                         "last round could not be written)")
    (False, 9, True, True)
    """
    reported = [o for o in outcomes if o is not None]
    failures = {int(r): (float(t), int(c)) for o in reported for r, (t, c) in o["failures"].items()}
    missing = [str(node) for node, o in enumerate(outcomes) if o is None]
    unheard = f" (node {', '.join(missing)} did not report)" if missing else ""
    stopped = next((o["stopped"] for o in reported if o["stopped"]), "")
    decision = {"restart": False, "status": 0, "restarted": restarted, "stopped": bool(stopped)}
    if not failures:
        said = (f"the ranks were told to stop ({stopped}; each checkpoints its part of a last round)" if stopped
                else "the ranks finished")
        return {**decision, "said": f"crossdistil train: {said}{unheard}"}
    rank, code = deciding_failure(failures)
    status = code if code > 0 else 1
    failed = f"rank {rank} {exit_said(code)}"
    if stopped:
        why = f" ({STOP_FAILED.get(status) or NOT_RESTARTED.get(status) or 'see its log lines above'})"
        said = (f"the ranks were told to stop ({stopped}; each checkpoints its part of a last round): {failed}{why}")
    elif status in NOT_RESTARTED:
        said = (f"{failed} ({NOT_RESTARTED[status]}): the group is not restarted, a restart would fail the same way "
                "(the ranks' log lines above say why)")
    elif restarted >= restarts:
        said = (f"{failed} after {restarted} of {restarts} restarts (--max-restarts): giving up (the ranks' log "
                "lines above say why)")
    else:
        said = (f"{failed}: restarting the group ({restarted + 1} of {restarts} restarts); it resumes from the last "
                "complete checkpoint round")
        return {"restart": True, "status": status, "restarted": restarted + 1,
                "said": f"crossdistil train: {said}{unheard}"}
    return {**decision, "status": status, "said": f"crossdistil train: {said}{unheard}"}


def deciding_failure(failures: dict[int, tuple[float, int]]) -> tuple[int, int]:
    """The rank whose exit decides whether the group is restarted, and its exit code, of ``{rank: (time, exit
    code)}`` (torchrun's ``ChildFailedError.failures``; a negative code is a signal): the first to exit with a status
    of ``NOT_RESTARTED``, if any (the others then mostly lost it, status 8, or were stopped by torchrun), else the
    first to fail other than by losing another rank (8: a consequence; each node's agent times its own ranks' exits
    as it notices them, so on a busy machine a survivor's 8 can be timed before the death it follows), else the
    first to fail.

    >>> deciding_failure({0: (2.0, 10), 1: (1.0, 8)}), deciding_failure({0: (2.0, 8), 1: (1.0, -9)})
    ((0, 10), (1, -9))
    >>> deciding_failure({0: (1.0, 8), 1: (2.0, -9)}), deciding_failure({0: (2.0, 8), 1: (1.0, 8)})
    ((1, -9), (1, 8))
    """
    permanent = {rank: failure for rank, failure in failures.items() if failure[1] in NOT_RESTARTED}
    causes = {rank: failure for rank, failure in failures.items() if failure[1] != EXIT_RANKS}
    rank = min(permanent or causes or failures, key=lambda r: failures[r][0])
    return rank, failures[rank][1]


def exit_said(code: int) -> str:
    """How a rank's exit code reads ("exited with status 9", "was killed by signal 9 (SIGKILL)").

    >>> exit_said(9), exit_said(-9)
    ('exited with status 9', 'was killed by signal 9 (SIGKILL)')
    """
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = f" ({signal.Signals(-code).name})"
    except ValueError:
        name = ""
    return f"was killed by signal {-code}{name}"


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crossdistil train``; returns the exit status."""
    problem = flag_problem(args)
    if problem is not None:
        print(f"crossdistil train: {problem}", file=sys.stderr)
        return 2
    logs.configure(str(args.log_level))  # the Kafka client's repeated complaints during an outage are folded
    try:
        cfg = load_config(args.config, overrides=args.overrides)
        kafka_client_options(cfg.kafka)  # a missing SASL password or CA file is said now, not at the first poll
    except ConfigError as exc:
        print(f"crossdistil train: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.device:
        cfg.model.device = args.device
    if getattr(args, "warm_start", None):
        cfg.checkpoint.warm_start = args.warm_start
    world_size = getattr(args, "world_size", None)
    ranks_here = world_size is not None and world_size > 1 and "WORLD_SIZE" not in os.environ
    under_torchrun = os.environ.get("WORLD_SIZE", "")
    several = ranks_here or (under_torchrun.isdigit() and int(under_torchrun) > 1)
    if several and cfg.checkpoint.warm_start and cfg.checkpoint.warm_start_stream == "resume":
        print(f"crossdistil train: configuration error: {WARM_START_RANKS_RESUME}", file=sys.stderr)
        return 2
    # lazy: torch loads only when the configuration is checked or the daemon runs (crossdistil --help stays fast)
    from consumers.runtime.assembly import RANKS_WITHOUT_GRAPHS, model_config, model_device

    try:  # on every start: a bad model option or device is said now, before anything is built or connected
        model_config(cfg)
        model_device(cfg)
        if ranks_here and cfg.model.cuda_graphs:
            raise ValueError(RANKS_WITHOUT_GRAPHS)
    except (TypeError, ValueError) as exc:
        print(f"crossdistil train: configuration error in [model]: {exc}", file=sys.stderr)
        return 2
    folders = folder_problem(cfg, args)
    if args.check_config:
        if folders is not None:  # a property of this machine, not of the configuration: said, not refused
            print(f"crossdistil train: warning: on this machine, {folders}", file=sys.stderr)
        print(to_toml(cfg))
        return 0
    if folders is not None:
        print(f"crossdistil train: {folders}", file=sys.stderr)
        return 2
    try:
        start_ms = parse_time(args.from_time)
    except ValueError as exc:
        print(f"crossdistil train: --from-time: {exc}", file=sys.stderr)
        return 2
    if ranks_here:
        # The configuration and flags were checked once here, not by every rank and every restart of torchrun.
        argv = sys.argv[sys.argv.index("train") + 1:] if "train" in sys.argv else []
        nnodes, node_rank = getattr(args, "nnodes", 1), getattr(args, "node_rank", 0)
        command = torchrun_command(argv, world_size, getattr(args, "max_restarts", 3), nnodes, node_rank,
                                   f"{getattr(args, 'master_addr', None)}:{getattr(args, 'master_port', 29500)}",
                                   max(RENDEZVOUS_TIMEOUT_S, cfg.distributed.timeout_s + 60))
        where = f" on {nnodes} nodes, {world_size // nnodes} on node {node_rank}" if nnodes > 1 else ""
        print(f"crossdistil train: {world_size} ranks{where}: {' '.join(command[1:])}", flush=True)
        # a node waits for the others' outcomes longer than a rank waits for a lost peer (distributed.timeout_s)
        return launch_ranks(command[3:], Path(cfg.checkpoint.dir) / "launcher" / f"node-{node_rank}",
                            getattr(args, "exit_on_stop", 0))
    # Until the daemon's own handlers (Trainer.run), SIGTERM stops the start as Ctrl-C does: status 0, as documented.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run_daemon(cfg, args, start_ms)
    except KeyboardInterrupt:
        print("crossdistil train: stopped while starting; nothing was trained", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the numeric flags, if anything (argparse checks their types, not their ranges)."""
    world_size = getattr(args, "world_size", None)
    if world_size is not None and world_size < 1:
        return f"--world-size {world_size}: at least 1"
    several_nodes = getattr(args, "nnodes", 1) != 1 or getattr(args, "node_rank", 0)
    return ((node_flag_problem(args) if several_nodes else None) or exit_on_stop_problem(args)
            or _other_flag_problem(args))


def exit_on_stop_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--exit-on-stop``, if anything: the ranks' launcher applies it, and its status must not
    read as one of the trainer's own (1 to 10) nor as the shell's (126 and above: a command not run, a signal)."""
    status = getattr(args, "exit_on_stop", 0)
    if not status:
        return None
    if not 11 <= status <= 125:
        return (f"--exit-on-stop {status}: 11 to 125 (0, the default, exits 0 after a stop; 1 to 10 are the "
                "trainer's own statuses, 126 and above the shell's and signals')")
    world_size = getattr(args, "world_size", None)
    if world_size is None or world_size < 2:
        return (f"--exit-on-stop {status} needs --world-size N (N >= 2): it is the status of the ranks' launcher "
                "after a stop; one trainer exits 0 after a stop")
    return None


def node_flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--nnodes``, ``--node-rank`` and ``--master-addr``, if anything."""
    nnodes, node_rank, world_size = args.nnodes, args.node_rank, getattr(args, "world_size", None)
    if nnodes < 1:
        return f"--nnodes {nnodes}: at least 1"
    if world_size is None or world_size < 2:
        return "--nnodes and --node-rank need --world-size N (the ranks in all, N >= 2)"
    if world_size % nnodes:
        return (f"--world-size {world_size} is not a multiple of --nnodes {nnodes}: every machine runs as many "
                "ranks (--world-size counts the ranks on all machines)")
    if not 0 <= node_rank < nnodes:
        return f"--node-rank {node_rank}: 0 to --nnodes - 1 = {nnodes - 1}"
    if nnodes > 1 and not args.master_addr:
        return "--nnodes needs --master-addr HOST: node 0's address, the same on every node"
    if not 0 < args.master_port < 65536:
        return f"--master-port {args.master_port}: 1 to 65535"
    return None


def _other_flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the other numeric flags, if anything."""
    if args.torch_threads is not None and args.torch_threads < 0:
        return f"--torch-threads {args.torch_threads}: at least 1 (or 0 for torch's choice)"
    if args.exit_when_idle is not None and not 0 <= args.exit_when_idle < math.inf:
        return f"--exit-when-idle {args.exit_when_idle:g}: a finite number of seconds >= 0"
    return None


def folder_problem(cfg: Config, args: argparse.Namespace) -> str | None:
    """Why ``checkpoint.dir`` or ``--ledger`` cannot be (or become) a writable folder, if one cannot: said before
    the model is built and Kafka connected, instead of a traceback from the first ``mkdir``."""
    try:
        check_output_folder(Path(cfg.checkpoint.dir), "checkpoint.dir")
        if args.ledger:
            check_output_folder(Path(args.ledger), "--ledger")
    except ValueError as exc:
        return str(exc)
    return None


def _run_daemon(cfg: Config, args: argparse.Namespace, start_ms: int | None) -> int:
    """Build the trainer (one, or one rank of several under torchrun) and run it."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints every thread's stack
    # lazy: torch and kafka load only when the daemon runs (crossdistil --help stays fast)
    import torch

    from consumers.runtime.learner_process import LearnerProcessError
    from consumers.runtime.ranks import rank_from_env
    from consumers.state.checkpoints import CheckpointError
    from consumers.trainer.daemon import Trainer

    if args.torch_threads:  # 0 or none: torch's choice
        torch.set_num_threads(args.torch_threads)
    try:
        info = rank_from_env()
    except ValueError as exc:
        print(f"crossdistil train: {exc}", file=sys.stderr)
        return 2
    try:
        if info is not None:
            return _run_rank(cfg, info, args, start_ms)
        try:
            trainer = Trainer(cfg, exit_when_idle_s=args.exit_when_idle, ledger_dir=args.ledger, start_ms=start_ms)
        except (ValueError, OSError) as exc:
            return cannot_start(exc)
        return trainer.run()
    except (LearnerProcessError, CheckpointError) as exc:
        return failure_status(exc)


def failure_status(exc: Exception) -> int:
    """The exit status of a trainer (or a rank) whose learner process failed (6) or whose checkpoints cannot be used
    (2); said in one line."""
    # lazy: the learner process's module loads torch (crossdistil --help stays fast)
    from consumers.runtime.learner_process import LearnerProcessError

    if isinstance(exc, LearnerProcessError):
        print(f"crossdistil train: {exc}\nexiting with status 6 without a checkpoint (the last one is consistent: a "
              "restart resumes from it)", file=sys.stderr)
        return 6
    print(f"crossdistil train: {exc}", file=sys.stderr)
    return 2


def cannot_start(exc: ValueError | OSError) -> int:
    """Exit status 2 for a trainer that cannot be built: a value its parts refuse (the join's, the batcher's, the
    metrics'), or a folder that cannot be made; said in one line."""
    kind = "configuration error: " if isinstance(exc, ValueError) else ""
    print(f"crossdistil train: {kind}{exc}", file=sys.stderr)
    return 2


def _run_rank(cfg: Any, info: Any, args: argparse.Namespace, start_ms: int | None) -> int:
    """One rank of several (torchrun's environment): ``consumers.trainer.ranked``. Its exit status is also recorded
    where ``crossdistil train --world-size`` reads it after a stop (``record_exit_status``), whatever ended the rank:
    a status it returned, one its errors stand for (6, 2: :func:`failure_status`), or 1 for any other exception
    (raised on, as Python's exit with a traceback)."""
    # lazy: torch.distributed and the rank's errors load only for ranks (crossdistil --help stays fast)
    from consumers.runtime.learner_process import LearnerProcessError
    from consumers.runtime.ranks import record_exit_status
    from consumers.state.checkpoints import CheckpointError

    try:
        status = _rank_status(cfg, info, args, start_ms)
    except (LearnerProcessError, CheckpointError) as exc:
        status = failure_status(exc)
    except Exception:
        record_exit_status(info.rank, 1)
        raise
    record_exit_status(info.rank, status)
    return status


def _rank_status(cfg: Any, info: Any, args: argparse.Namespace, start_ms: int | None) -> int:
    """Build and run one rank; its exit status."""
    # lazy: torch.distributed and the rank's trainer load only for ranks (crossdistil --help stays fast)
    import torch

    from consumers.runtime.ranks import RankError, Ranks
    from consumers.trainer.ranked import RankTrainer

    device = cfg.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one GPU per rank on its machine
        device = f"cuda:{info.local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    cfg.model.device = device
    try:
        ranks = Ranks(info, cfg.distributed, device)
    except (RankError, RuntimeError, ValueError) as exc:
        print(f"crossdistil train: {info.label} could not join the other ranks within distributed.timeout_s = "
              f"{cfg.distributed.timeout_s:g} s: {exc}", file=sys.stderr)
        return EXIT_RANKS
    try:
        trainer = RankTrainer(cfg, ranks, exit_when_idle_s=args.exit_when_idle, ledger_dir=args.ledger,
                              start_ms=start_ms)
    except (ValueError, OSError) as exc:
        ranks.close()
        return cannot_start(exc)
    return trainer.run()

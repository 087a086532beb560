"""How long ``crossdistil --help`` and ``crossdistil COMMAND --help`` take, today's against the former way, side by
side; prints one JSON object.

    python bench/cli_startup.py --rounds 15                 # ~1 min on a quiet 2-core machine
    python bench/cli_startup.py --root /tmp/checkout        # the code of another checkout (e.g. `git archive HEAD`)

Each variant is a fresh interpreter (``python -c``) in the checkout; the rounds run every variant once, in turn, so
a busy moment slows all of them alike. ``before_*`` is the former ``--help``: kafka-python and numpy imported (as
``streamer.topics``, ``streamer.kafka_security`` and ``consumers.core.pipeline`` did when the parser was built),
then the parser with every subcommand's flags (every subcommand module imported). ``all_flags`` is that parser
without the pre-imports: what the subcommand modules cost now. Medians of wall and CPU seconds (user + system of
the child) per variant, with each variant's modules of torch, kafka and numpy loaded (none, for the new ones).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

_BEFORE = "import kafka, kafka.net.sasl, numpy\nimport consumers.cli\nparser = consumers.cli.build_parser()\n"
_NOW = "import consumers.cli\n"
_REPORT = ("import sys\nprint('HEAVY', sorted(m for m in ('kafka', 'numpy', 'torch') if m in sys.modules), "
           "file=sys.stderr)\n")
VARIANTS = {
    "before_help": _BEFORE + "parser.parse_args(['--help'])\n",
    "help": _NOW + "consumers.cli.main(['--help'])\n",
    "all_flags_help": _NOW + "consumers.cli.build_parser().parse_args(['--help'])\n",
    "before_backtest_help": _BEFORE + "parser.parse_args(['backtest', '--help'])\n",
    "backtest_help": _NOW + "consumers.cli.main(['backtest', '--help'])\n",
    "before_train_help": _BEFORE + "parser.parse_args(['train', '--help'])\n",
    "train_help": _NOW + "consumers.cli.main(['train', '--help'])\n",
}


def run_once(code: str, root: Path) -> tuple[float, float, list[str]]:
    """Wall and CPU seconds of ``python -c CODE`` in ``root`` (which exits through argparse's --help), and the
    heavy modules it had loaded."""
    wrapped = f"try:\n{_indent(code)}\nexcept SystemExit:\n    pass\n{_REPORT}"
    env = {**os.environ, "PYTHONPATH": str(root)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapped], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"a variant failed:\n{code}\n{done.stderr}")
    heavy = next(line for line in done.stderr.splitlines() if line.startswith("HEAVY "))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(heavy[len("HEAVY "):].replace("'", '"'))


def _indent(code: str) -> str:
    return "\n".join("    " + line for line in code.strip().splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="runs of every variant (default 15)")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="the checkout to measure (default: this one)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpus: dict[str, list[float]] = {name: [] for name in VARIANTS}
    loaded: dict[str, list[str]] = {}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, code in VARIANTS.items():
            wall, cpu, loaded[name] = run_once(code, args.root)
            walls[name].append(wall)
            cpus[name].append(cpu)
    result = {
        "benchmark": "cli_startup",
        "root": str(args.root),
        "python": sys.version.split()[0],
        "rounds": args.rounds,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "variants": {name: {"median_wall_s": round(statistics.median(walls[name]), 3),
                            "median_cpu_s": round(statistics.median(cpus[name]), 3),
                            "min_wall_s": round(min(walls[name]), 3), "max_wall_s": round(max(walls[name]), 3),
                            "heavy_modules_loaded": loaded[name]}
                     for name in VARIANTS},
    }
    for command in ("help", "backtest_help", "train_help"):
        before, now = result["variants"][f"before_{command}"], result["variants"][command]
        result[f"speedup_{command}_cpu"] = round(before["median_cpu_s"] / now["median_cpu_s"], 2)
        result[f"speedup_{command}_wall"] = round(before["median_wall_s"] / now["median_wall_s"], 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

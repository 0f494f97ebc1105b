"""Server scale-out benchmark: 10^5 simulated devices checking in, almost all told "come back
later", the few given a slot downloading the model and uploading a precomputed delta, against
the single process (`asyncfl serve`, SQLite) and the cluster over PostgreSQL with 1 and 2
selectors, side by side in one run, on loopback.

Each target runs three phases, then a fourth on a fresh copy of it:
- Sustained: a closed loop of `--inflight` keep-alive connections checking in back to back:
  check-ins/s and updates/s with their p50/p99 latencies, and the CPU every process used over
  the window (/proc utime+stime: server or selectors, aggregator, coordinator, PostgreSQL's
  backends summed, the load generator itself), hence check-ins/s per core of selector.
- Goal rate: an open loop offering each selector (or the single process) the goal's 2,000
  check-ins/s; its latencies are those of a server at that load, not at its saturation (a
  closed loop's tail is mostly its own queue).
- Overload: an open loop offering 10x the sustained check-in rate (up to `--overload-inflight`
  connections): refusals counted (429/503, with or without Retry-After).
- Overload of a budget: every selector (or the single process) started with a check-in budget of
  `--budget`/s (`server.checkin_rate_per_s`), and offered 10x the budgets. A selector's full
  capacity is more than a Python load generator sharing the machine can offer tenfold.
Where the machine has a core more than a target has serving processes (the single server, or its
selectors), each of them runs on a core of its own and everything else (the generator, PostgreSQL,
the aggregator, the coordinator) on the cores left: capacity "per core" is then that of a core the
serving process shares with nothing, as a deployment gives each selector its own. Otherwise, or
with `--shared`, the OS places every process on every core.
Every upload acknowledged in a phase is then looked up in the update log (missing or there twice:
lost or duplicated). Each device is client d{i} with a token of its own, minted in one
transaction (SQLite) or one COPY (PostgreSQL; signed, so selectors verify them in memory).

    python bench/server_scale.py [--json] [--quick] [--seconds 15] [--devices 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from loadgen import Fleet  # noqa: E402  (bench/loadgen.py)
from server import experiment as server_experiment  # noqa: E402  (bench/server.py)

from asyncfl.server.testing import Child, ServerProcess, kill_child, mint_tokens, wait_healthy  # noqa: E402

TASK = "bench"
SELECTOR_GOAL_PER_CORE, P99_GOAL_MS, OVERLOAD_X = 2000.0, 50.0, 10.0
TICK = os.sysconf("SC_CLK_TCK")


def experiment(hidden: list[int], concurrency: int, buffer_size: int) -> dict:
    """bench/server.py's FedBuff task with `concurrency` slots and the default per-client rate
    limits (each device checks in rarely)."""
    tree = server_experiment(hidden, concurrency, buffer_size)
    for key in ("rate_per_s", "rate_burst"):
        del tree["server"][key]
    tree["data"]["num_clients"] = 100
    return tree


def cpu_of(pid: int) -> float:
    """utime+stime of a process (all its threads), in seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return found


class Single:
    """`asyncfl serve` over SQLite, as bench/server.py starts it."""

    name, selectors = "single", 0

    def __init__(self, tree: dict, workdir: Path, devices: int, budget: float | None = None):
        if budget is not None:
            tree = tree | {"server": tree["server"] | {"checkin_rate_per_s": budget}}
        self.server = ServerProcess(tree, workdir)
        t0 = time.perf_counter()
        self.tokens = mint_tokens(self.server.state_dir, TASK, [f"d{i}" for i in range(devices)])
        self.mint_s = time.perf_counter() - t0
        self.server.start()
        self.endpoints = [("127.0.0.1", self.server.port)]

    def processes(self) -> dict[str, list[int]]:
        return {"server": [self.server.proc.pid]}

    def stop(self) -> None:
        self.server.kill(signal.SIGTERM)

    def update_log(self) -> list[tuple[str, str]]:
        from asyncfl.server.store import Store

        store = Store(self.server.state_dir)
        try:
            return [tuple(r) for r in store.query("SELECT client, idem_key FROM updates")]
        finally:
            store.close()


class Cluster:
    """Aggregator, coordinator and `selectors` selectors, each `asyncfl serve --role` in its own
    process, over a fresh database of the bench's LocalPostgres."""

    def __init__(self, pg, tree: dict, workdir: Path, devices: int, selectors: int, budget: float | None = None):
        from asyncfl import config
        from asyncfl.cluster.arguments import DATABASE_URL_ENV
        from asyncfl.cluster.db import migrate
        from asyncfl.cluster.members import session
        from asyncfl.cluster.tasks import add_task, create_tokens

        self.pg, self.selectors = pg, selectors
        self.name = f"cluster-{selectors}"
        self.url = pg.create_database(f"bench_{selectors}" + ("_budget" if budget else ""))
        migrate(self.url)
        with session(self.url) as conn:
            add_task(conn, config.validate(tree), None, TASK)
            t0 = time.perf_counter()
            self.tokens = create_tokens(conn, [f"d{i}" for i in range(devices)], TASK)
            self.mint_s = time.perf_counter() - t0
        env = {DATABASE_URL_ENV: self.url}
        workdir.mkdir(parents=True, exist_ok=True)
        self.roles = {
            role: Child(["serve", "--role", role, "--log-level", "warning"], workdir / f"{role}.log", env)
            for role in ("aggregator", "coordinator")
        }
        ports = [_free_port() for _ in range(selectors)]
        for i, port in enumerate(ports):
            argv = ["serve", "--role", "selector", "--port", str(port), "--log-level", "warning"]
            if budget is not None:  # the selector-wide settings
                settings = workdir / "selector.yaml"
                settings.write_text(json.dumps({"checkin_rate_per_s": budget}))
                argv += ["--server-config", str(settings)]
            self.roles[f"selector-{i + 1}"] = Child(argv, workdir / f"selector-{i + 1}.log", env)
        for i, port in enumerate(ports):
            wait_healthy(self.roles[f"selector-{i + 1}"], f"http://127.0.0.1:{port}", "selector", workdir, 120)
        self.endpoints = [("127.0.0.1", port) for port in ports]
        self._wait_for_slots(workdir)

    def _wait_for_slots(self, workdir: Path, timeout: float = 60) -> None:
        """Until the coordinator has granted slots to every selector."""
        from asyncfl.cluster.members import session

        deadline = time.monotonic() + timeout
        with session(self.url) as conn:
            while time.monotonic() < deadline:
                (granted,) = conn.execute(
                    "SELECT count(DISTINCT selector) FROM slots WHERE task=%s AND selector IS NOT NULL", (TASK,)
                ).fetchone()
                if granted >= self.selectors:
                    return
                time.sleep(0.1)
        raise TimeoutError(f"the coordinator granted no slots to {self.selectors} selectors; see {workdir}")

    def processes(self) -> dict[str, list[int]]:
        postmaster = self.pg.postmaster_pid()
        return {name: [child.pid] for name, child in self.roles.items()} | {
            "postgres": [postmaster, *children_of(postmaster)]
        }

    def stop(self) -> None:
        for child in reversed(list(self.roles.values())):  # selectors first
            kill_child(child, signal.SIGTERM)

    def update_log(self) -> list[tuple[str, str]]:
        from asyncfl.cluster.members import session

        with session(self.url) as conn:
            return [tuple(r) for r in conn.execute("SELECT client, idem_key FROM updates WHERE task=%s", (TASK,))]


def start_forkserver() -> None:
    """The process that forks every server and role imports torch and the web stack once; start
    it now, so those imports overlap with PostgreSQL's initdb and the token minting."""
    from multiprocessing import forkserver

    from asyncfl.server import testing

    # the servers run this checkout's code, as this process does, wherever it is started from
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    testing._context()
    forkserver.ensure_running()


SERVING = ("server", "selector")


def pin(pid: int, cores: list[int]) -> None:
    """Every thread of `pid` on `cores` (threads it starts later inherit them)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.sched_setaffinity(int(tid), cores)


@contextlib.contextmanager
def placed(target, spread: bool):
    """With `spread` and a core more than the target has serving processes (the single server,
    or its selectors): each serving process on a core of its own, and everything else (this
    generator, PostgreSQL, the aggregator, the coordinator) on the cores left, so that "per core"
    means a core the serving process shares with nothing. Yields the placement, or None where
    the OS places every process (then they share every core). This process's cores are given
    back at the end."""
    cores = sorted(os.sched_getaffinity(0))
    groups = target.processes()
    serving = [name for name in groups if name.startswith(SERVING)]
    if not spread or len(cores) <= len(serving):
        yield None
        return
    own = {name: [cores[i + 1]] for i, name in enumerate(serving)}
    rest = [cores[0], *cores[len(serving) + 1 :]]
    for name, pids in groups.items():
        for pid in pids:
            pin(pid, own.get(name, rest))
    pin(os.getpid(), rest)
    try:
        yield own | {"others": rest}
    finally:
        pin(os.getpid(), cores)


def _free_port() -> int:
    from asyncfl.server.testing import free_port

    return free_port()


class CpuWindow:
    """CPU seconds of each named group of processes (and of this generator) between two marks."""

    def __init__(self, processes):
        self.processes, self.at = processes, [None, None]

    def mark(self, i: int) -> None:
        groups = self.processes() | {"loadgen": [os.getpid()]}
        self.at[i] = (time.perf_counter(), {name: {pid: cpu_of(pid) for pid in pids} for name, pids in groups.items()})

    def cores(self) -> tuple[float, dict[str, float]]:
        (t0, start), (t1, end) = self.at
        wall = t1 - t0
        used = {
            name: sum(cpu - start.get(name, {}).get(pid, 0.0) for pid, cpu in pids.items()) / wall
            for name, pids in end.items()
        }
        return wall, {name: round(c, 3) for name, c in used.items()}


def measure(fleet: Fleet, target, seconds: float, warmup: float, inflight: int, rate: float | None, grace: float):
    window = CpuWindow(target.processes)
    stats = asyncio.run(fleet.phase(seconds, warmup, inflight, rate, grace, window.mark))
    wall, cores = window.cores()
    out = stats.summary(seconds) | {"window_s": round(wall, 3), "cpu_cores": cores}
    selector_cores = sum(c for name, c in cores.items() if name.startswith(("selector", "server")))
    out["checkins_per_selector_core"] = round(out["checkins_per_s"] / selector_cores, 1) if selector_cores else None
    if rate is not None:
        out["offered_per_s"] = round(stats.offered / seconds, 1)
        out["sent_per_s"] = round((stats.offered - stats.capped) / seconds, 1)
        out["capped"] = stats.capped
    return out, stats.acknowledged


def run_target(target, fleet: Fleet, args) -> dict:
    """Sustained, goal rate and overload phases on one target, then stopped: every upload
    acknowledged in them looked up in its update log."""
    sustained, acked = measure(fleet, target, args.seconds, args.warmup, args.inflight, None, 2.0)
    goal_rate = SELECTOR_GOAL_PER_CORE * max(1, target.selectors)
    at_goal, acked_goal = measure(fleet, target, args.goal_seconds, args.warmup, args.overload_inflight, goal_rate, 2.0)
    rate = OVERLOAD_X * max(sustained["checkins_per_s"], 1.0)
    overload, acked_over = measure(fleet, target, args.overload_seconds, 0.0, args.overload_inflight, rate, args.grace)
    overload["offered_x"] = round(overload["offered_per_s"] / max(sustained["checkins_per_s"], 1.0), 2)
    overload["sent_x"] = round(overload["sent_per_s"] / max(sustained["checkins_per_s"], 1.0), 2)
    overload |= exactly_once(target, acked + acked_goal + acked_over)
    return {"token_mint_s": round(target.mint_s, 3), "sustained": sustained, "goal_rate": at_goal, "overload": overload}


def run_budgeted(target, fleet: Fleet, args) -> dict:
    """The overload phase again, on a target whose every process has a check-in budget
    (`server.checkin_rate_per_s`): OVERLOAD_X times the budgets offered, then stopped."""
    budget = args.budget * max(1, target.selectors)
    rate = OVERLOAD_X * budget
    over, acked = measure(fleet, target, args.overload_seconds, args.warmup, args.overload_inflight, rate, 2.0)
    over["budget_per_s"] = budget
    over["offered_x"] = round(over["offered_per_s"] / budget, 2)
    over["sent_x"] = round(over["sent_per_s"] / budget, 2)
    return over | exactly_once(target, acked)


def exactly_once(target, acknowledged: list[tuple[str, str]]) -> dict:
    """Stops the target, then: uploads answered 200 missing from its update log, or there twice."""
    target.stop()
    logged: dict[tuple[str, str], int] = {}
    for entry in target.update_log():
        logged[entry] = logged.get(entry, 0) + 1
    return {
        "lost": sum(1 for key in acknowledged if logged.get(key, 0) == 0),
        "duplicated": sum(1 for key in acknowledged if logged.get(key, 0) > 1),
        "acknowledged_total": len(acknowledged),
    }


def fleet_for(target, args) -> tuple[list[tuple], Fleet]:
    """The task's tensor shapes, read from a selector, and the devices that will load it."""
    host, port = target.endpoints[0]
    info = httpx.get(f"http://{host}:{port}/v1/task", headers={"Authorization": f"Bearer {target.tokens[0]}"}).json()
    names = [t["name"] for t in info["tensors"]]
    shapes = [tuple(t["shape"]) for t in info["tensors"]]
    return shapes, Fleet(target.endpoints, target.tokens, names, shapes, args.train_seconds)


def goals(results: dict) -> dict:
    out = {}
    for name, r in results.items():
        s, g, o = r["sustained"], r["goal_rate"], r["overload"]
        if name.startswith("cluster"):
            per_core = s["checkins_per_selector_core"] or 0.0
            served = g["checkins_per_s"] >= 0.95 * g["offered_per_s"] and g["capped"] == 0 and not g["shed_total"]
            where = "each on a core of its own" if r.get("placement") else "sharing every core with every process"
            out[
                f"{name}: selector ({where}) >= {SELECTOR_GOAL_PER_CORE:,.0f} check-ins/s per core (closed loop), "
                f"and {SELECTOR_GOAL_PER_CORE:,.0f}/s each answered with p99 < {P99_GOAL_MS:g} ms"
            ] = per_core >= SELECTOR_GOAL_PER_CORE and served and (g["checkin_p99_ms"] or math.inf) < P99_GOAL_MS
        # capped: sessions due while every connection still waited for an answer, i.e. not shed
        graceful = o["shed_without_retry_after"] == 0 and o["transport_errors"] == 0 and o["capped"] == 0
        out[f"{name}: {OVERLOAD_X:g}x overload offered, nothing lost, shed by 429/503 + Retry-After"] = (
            o["offered_x"] >= OVERLOAD_X * 0.95 and o["lost"] == 0 and o["duplicated"] == 0 and graceful
        )
        b = r["overload_budget"]
        graceful = b["shed_without_retry_after"] == 0 and b["transport_errors"] == 0 and b["capped"] == 0
        out[
            f"{name}: {OVERLOAD_X:g}x a check-in budget of {b['budget_per_s']:,.0f}/s offered, nothing lost, "
            f"shed by 429/503 + Retry-After, the admitted answered with p99 < {P99_GOAL_MS:g} ms"
        ] = (
            b["offered_x"] >= OVERLOAD_X * 0.95
            and b["lost"] == 0
            and b["duplicated"] == 0
            and graceful
            and (b["checkin_p99_ms"] or math.inf) < P99_GOAL_MS
        )
    return out


def table(result: dict) -> str:
    rows = [
        "| target | check-ins/s | check-in p50 / p99 ms | updates/s | upload p50 / p99 ms | train frac | "
        "check-ins/s per selector core | CPU cores (window) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    at_goal = [
        "| target | offered/s | check-ins answered 200/s | check-in p50 / p99 ms | with a lease p50 / p99 ms | "
        "updates/s | check-ins/s per selector core | CPU cores (window) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    over = [
        "| target | offered/s (x sustained) | sent/s | capped | check-ins answered 200/s (p99 ms) | shed 429/503 | "
        "without Retry-After | transport errors | acked uploads | lost | duplicated |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    budgeted = [
        "| target | budget/s | offered/s (x budget) | sent/s | capped | check-ins answered 200/s (p50 / p99 ms) | "
        "shed 429/503 | without Retry-After | transport errors | acked uploads | lost | duplicated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["targets"].items():
        s, g, o, b = r["sustained"], r["goal_rate"], r["overload"], r["overload_budget"]
        budgeted.append(
            f"| {name} | {b['budget_per_s']:,.0f} | {b['offered_per_s']:,.0f} ({b['offered_x']}x) | "
            f"{b['sent_per_s']:,.0f} | {b['capped']} | {b['checkins_per_s']:,.0f} ({b['checkin_p50_ms']} / "
            f"{b['checkin_p99_ms']}) | {b['shed_total']} | {b['shed_without_retry_after']} | "
            f"{b['transport_errors']} | {b['acknowledged_total']} | {b['lost']} | {b['duplicated']} |"
        )
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in s["cpu_cores"].items())
        at_goal.append(
            f"| {name} | {g['offered_per_s']:,.0f} | {g['checkins_per_s']:,.0f} | {g['checkin_p50_ms']} / "
            f"{g['checkin_p99_ms']} | {g['checkin_train_p50_ms']} / {g['checkin_train_p99_ms']} | "
            f"{g['updates_per_s']:,.1f} | {g['checkins_per_selector_core'] or 0:,.0f} | "
            + ", ".join(f"{k} {v:.2f}" for k, v in g["cpu_cores"].items())
            + " |"
        )
        rows.append(
            f"| {name} | {s['checkins_per_s']:,.0f} | {s['checkin_p50_ms']} / {s['checkin_p99_ms']} | "
            f"{s['updates_per_s']:,.1f} | {s['upload_p50_ms']} / {s['upload_p99_ms']} | {s['train_fraction']:.3f} | "
            f"{s['checkins_per_selector_core'] or 0:,.0f} | {cpu} |"
        )
        over.append(
            f"| {name} | {o['offered_per_s']:,.0f} ({o['offered_x']}x) | {o['sent_per_s']:,.0f} | {o['capped']} | "
            f"{o['checkins_per_s']:,.0f} ({o['checkin_p99_ms']}) | {o['shed_total']} | "
            f"{o['shed_without_retry_after']} | {o['transport_errors']} | {o['acknowledged_total']} | {o['lost']} | "
            f"{o['duplicated']} |"
        )
    verdicts = [f"- {'met' if ok else 'UNMET'}: {goal}" for goal, ok in result["goals"].items()]
    placements = [
        f"- {name}: "
        + (
            "; ".join(f"{process} on cores {cores}" for process, cores in r["placement"].items())
            if r["placement"]
            else "every process on every core"
        )
        for name, r in result["targets"].items()
    ]
    return "\n".join(
        [
            "Sustained (closed loop):",
            "",
            *rows,
            "",
            f"At the goal's rate ({SELECTOR_GOAL_PER_CORE:,.0f}/s per selector, open loop):",
            "",
            *at_goal,
            "",
            "Overload (open loop, no check-in budget):",
            "",
            *over,
            "",
            "Overload of a check-in budget (server.checkin_rate_per_s on every selector, open loop):",
            "",
            *budgeted,
            "",
            "Placement:",
            *placements,
            "",
            *verdicts,
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="short phases (the test's mode)")
    ap.add_argument("--seconds", type=float, default=15.0, help="sustained phase, per target")
    ap.add_argument("--goal-seconds", type=float, default=10.0, help="open loop at the goal's rate, per target")
    ap.add_argument("--overload-seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--grace", type=float, default=5.0, help="seconds uploads are retried after a phase")
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--inflight", type=int, default=32, help="requests in flight, sustained phase")
    ap.add_argument("--overload-inflight", type=int, default=1024, help="cap on requests in flight, overload")
    ap.add_argument(
        "--budget", type=float, default=250.0, help="check-ins/s per selector (server.checkin_rate_per_s), last phase"
    )
    ap.add_argument("--concurrency", type=int, default=32, help="the task's slots (devices training at once)")
    ap.add_argument("--train-seconds", type=float, default=0.2, help="a training device's sleep before uploading")
    ap.add_argument("--hidden", type=int, nargs="+", default=[64], help="MLP widths (default 4,810 params)")
    ap.add_argument("--buffer-size", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["single", "cluster-1", "cluster-2"])
    ap.add_argument(
        "--shared",
        action="store_true",
        help="let the OS place every process (default: each serving process on a core of its own where "
        "the machine has a core more than the target has serving processes)",
    )
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.goal_seconds, args.overload_seconds, args.warmup, args.grace = 1.5, 1.0, 1.0, 0.5, 0.5
        args.devices = min(args.devices, 10_000)
    from asyncfl.cluster.postgres import LocalPostgres

    start_forkserver()

    tree = experiment(args.hidden, args.concurrency, args.buffer_size)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        pg = stack.enter_context(LocalPostgres()) if any(t != "single" for t in args.targets) else None
        for name in args.targets:
            results[name] = {}
            for budget in (None, args.budget):
                workdir = Path(tmp) / (name if budget is None else f"{name}-budget")
                started = time.perf_counter()
                if name == "single":
                    target = Single(tree, workdir, args.devices, budget)
                else:
                    target = Cluster(pg, tree, workdir, args.devices, int(name.split("-")[1]), budget)
                try:
                    shapes, fleet = fleet_for(target, args)
                    what = name if budget is None else f"{name} with a check-in budget"
                    print(f"{what}: up in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
                    with placed(target, not args.shared) as placement:
                        if budget is None:
                            results[name] |= run_target(target, fleet, args) | {"placement": placement}
                        else:
                            results[name]["overload_budget"] = run_budgeted(target, fleet, args)
                    print(f"{what}: measured in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
                finally:
                    target.stop()
    params = sum(math.prod(s) for s in shapes)
    result = {
        "devices": args.devices,
        "params": params,
        "concurrency": args.concurrency,
        "inflight": args.inflight,
        "overload_inflight": args.overload_inflight,
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
        "targets": results,
    }
    result["goals"] = goals(results)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`asyncfl` command line: simulate one run, compare a preset's runs side by side, or run the
network server (`serve`, one process or `--role` of the multi-process one), a client (`client`),
the token admin (`token`), the trusted secure aggregator (`tsa`) and the multi-process server's
database tools (`db`), tasks and local cluster (`cluster`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from asyncfl import config
from asyncfl.attacks import KINDS as ATTACK_KINDS
from asyncfl.cluster.arguments import add_cluster_command, add_database_url, add_serve_role, add_token_database
from asyncfl.experiment import run_experiment

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # `serve --log-level`: uvicorn's


def _threads(value: str) -> int | str:
    """--threads: 'auto' or a count of at least 1."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise config.ConfigError(f"--threads must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise config.ConfigError(f"--threads must be at least 1, got {n}")
    return n


def _add_config_args(p: argparse.ArgumentParser, allow_file: bool) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    if allow_file:
        src.add_argument("--config", type=Path, help="experiment YAML file")
    src.add_argument("--preset", help=f"built-in experiment: {', '.join(config.preset_names())}")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set population.devices=500 "
        "or --set runs.fedbuff.algorithm.buffer_size=5 (repeatable)",
    )
    p.add_argument("--seed", type=int, help="override the experiment seed")
    p.add_argument(
        "--ray-address",
        help="executor ray, or a study's / robustness matrix's backend ray: join this Ray cluster ('auto', "
        "or the head's HOST:PORT) instead of starting Ray on this machine; the config's ray_address",
    )
    p.add_argument("--out", type=Path, required=True, help="results directory")
    p.add_argument("--quick", action="store_true", help="apply the experiment's quick: block (a small variant)")
    p.add_argument(
        "--threads",
        default="auto",
        help="torch intra-op threads, or 'auto' (default): time one training pass with one thread and "
        "with torch's default (one per core) and keep the faster; waiting threads slow small "
        "models down many times on a busy machine",
    )


def _add_network_commands(sub) -> None:
    srv = sub.add_parser("serve", help="run the federated-learning server (HTTP)")
    srv.add_argument("--config", type=Path, help="experiment YAML (may hold a server: section); --role server only")
    srv.add_argument("--run", help="which of the config's runs (default: the first)")
    add_serve_role(srv)
    srv.add_argument("--server-config", type=Path, help="server settings YAML (limits, leases, rate limits)")
    srv.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set server.lease_timeout=30",
    )
    srv.add_argument("--seed", type=int)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--state-dir", type=Path, default=Path("server-state"), help="durable state (SQLite, checkpoints)")
    srv.add_argument("--ssl-certfile", help="TLS certificate (PEM); serve HTTPS")
    srv.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    srv.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    cli = sub.add_parser("client", help="run a training client against a server")
    cli.add_argument("--server", required=True, help="server URL, e.g. https://host:8443")
    cli.add_argument("--token", help="client token (or env ASYNCFL_TOKEN)")
    cli.add_argument(
        "--data",
        required=True,
        help="digits:client=K, package.module:function returning (x, y), or a path to an .npz with arrays x, y",
    )
    cli.add_argument("--ca-cert", help="CA bundle to verify the server's TLS certificate")
    cli.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify TLS certificates, and allow plain http to another host (testing only)",
    )
    cli.add_argument("--max-trips", type=int, help="stop after this many trips")
    cli.add_argument("--eligibility", help="module:function returning True when the device may train")
    cli.add_argument("--ack-log", type=Path, help="append each upload's answer as a JSON line")
    cli.add_argument(
        "--state",
        type=Path,
        help="file keeping the algorithm's per-client state between trips and "
        "restarts (SCAFFOLD's control variate); default: ACK_LOG.state.pt",
    )
    cli.add_argument("--tsa-key", help="pinned public key (base64) of the task's trusted secure aggregator")
    cli.add_argument("--backoff-cap", type=float, default=10.0, help="longest wait between retries (s)")
    cli.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    cli.add_argument(
        "--attack",
        choices=ATTACK_KINDS,
        help="act as a malicious client (testing defences): corrupt every update this way",
    )
    cli.add_argument("--attack-factor", type=float, default=10.0, help="sign_flip: delta x -S; scale: delta x S")
    cli.add_argument("--attack-noise-std", type=float, default=1.0, help="gaussian, collude: std per coordinate")
    cli.add_argument("--attack-seed", type=int, default=0, help="collude: seed of the vector all colluders send")
    _add_tsa_command(sub)
    tok = sub.add_parser("token", help="create, list or revoke client and operator tokens (stored hashed)")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    create = tsub.add_parser("create", help="mint a token and print it once")
    create.add_argument("--state-dir", type=Path, default=Path("server-state"))
    add_token_database(create)
    create.add_argument(
        "--task", help="task id (the run's name unless server.task is set); optional for --operator: any task"
    )
    create.add_argument("--client", required=True, help="client id (or operator name) the token authenticates")
    create.add_argument(
        "--operator",
        action="store_true",
        help="an operator token: reads /status, /metrics, /v1/history, the dashboard and the API docs; cannot upload",
    )
    for name, help_ in (("list", "list clients and tasks (never the tokens)"), ("revoke", "revoke a client's tokens")):
        p = tsub.add_parser(name, help=help_)
        p.add_argument("--state-dir", type=Path, default=Path("server-state"))
        if name == "revoke":
            add_token_database(p)
            p.add_argument("--client", required=True)
    rotate = tsub.add_parser("rotate-key", help="cluster: a new signing key for client tokens minted from now on")
    add_token_database(rotate)
    rotate.add_argument("--retire-old", action="store_true", help="refuse tokens signed by the older keys from now on")


def _add_tsa_command(sub) -> None:
    tsa = sub.add_parser("tsa", help="the trusted secure aggregator (stands in for a TEE enclave)")
    tsub = tsa.add_subparsers(dest="tsa_command", required=True)
    init = tsub.add_parser("init", help="create the key pair in a state dir; prints the public key (base64)")
    init.add_argument("--state", type=Path, required=True, help="state dir (0700): key pair and used contributions")
    srv = tsub.add_parser("serve", help="answer the FL server's unmask requests (HTTP)")
    srv.add_argument("--state", type=Path, required=True)
    srv.add_argument("--task", required=True, help="the FL server's task id (seeds are sealed to it)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8090)
    srv.add_argument("--token-file", type=Path, help="bearer token shared with the FL server (or $ASYNCFL_TSA_TOKEN)")
    srv.add_argument(
        "--config", type=Path, help="the FL server's experiment YAML: length, K, max weight and DP noise from it"
    )
    srv.add_argument("--run", help="which of the config's runs (default: the first)")
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    srv.add_argument("--length", type=int, help="model parameters (coordinates per update)")
    srv.add_argument("--min-contributions", type=int, help="K: fewest distinct contributions a sum may have")
    srv.add_argument("--max-weight", type=int, help="largest integer weight of one contribution")
    srv.add_argument("--bits", type=int, help="ring bits (default 32)")
    srv.add_argument("--log-level", default="warning", choices=LOG_LEVELS)


def _add_db_command(sub) -> None:
    db = sub.add_parser("db", help="the multi-process server's PostgreSQL database")
    dsub = db.add_subparsers(dest="db_command", required=True)
    mig = dsub.add_parser("migrate", help="create or upgrade the schema (idempotent; safe to run concurrently)")
    add_database_url(mig)


def _network_command(args) -> int:
    """Web-stack commands load lazily, so the simulator's commands stay light."""
    if args.command == "db":
        from asyncfl.cluster.db import migrate_command as run
    elif args.command == "client":
        from asyncfl.client.main import client as run
    elif args.command == "tsa":
        from asyncfl.tsa.commands import tsa as run
    elif args.command == "cluster":
        from asyncfl.cluster.commands import cluster as run
    else:
        from asyncfl.server.commands import serve, token

        run = serve if args.command == "serve" else token
    try:
        return run(args)
    except config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _add_privacy_command(sub) -> None:
    priv = sub.add_parser("privacy", help="differential-privacy tools")
    psub = priv.add_subparsers(dest="privacy_command", required=True)
    eps = psub.add_parser("epsilon", help="epsilon of T Poisson-subsampled Gaussian steps (RDP accountant)")
    eps.add_argument("--noise-multiplier", type=float, required=True, help="sigma: noise std / clip norm")
    eps.add_argument("--sample-rate", type=float, required=True, help="q: probability a user is in a step")
    eps.add_argument("--steps", type=int, required=True, help="T: noisy aggregates (server steps)")
    eps.add_argument("--delta", type=float, required=True, help="delta, e.g. 1e-5 (below 1 / users)")


def _privacy_command(args) -> int:
    """Prints epsilon alone on stdout (a number scripts can read)."""
    from asyncfl.privacy import epsilon

    try:
        print(repr(epsilon(args.noise_multiplier, args.sample_rate, args.steps, args.delta)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run one simulation")
    _add_config_args(sim, allow_file=True)
    sim.add_argument("--run", help="which of the config's runs (default: the first)")
    cmp_ = sub.add_parser("compare", help="run every run of a preset or config side by side")
    _add_config_args(cmp_, allow_file=True)
    sub.add_parser("presets", help="list the built-in presets")
    _add_network_commands(sub)
    _add_db_command(sub)
    add_cluster_command(sub)
    _add_privacy_command(sub)
    args = parser.parse_args(argv)
    if args.command in ("serve", "client", "token", "tsa", "db", "cluster"):
        return _network_command(args)
    if args.command == "privacy":
        return _privacy_command(args)
    console = Console() if sys.stdout.isatty() else Console(width=150)
    try:
        if args.command == "presets":
            for name in config.preset_names():
                console.print(name)
            return 0
        threads = _threads(args.threads)
        cfg = config.load(
            getattr(args, "config", None), args.preset, args.overrides, args.seed, quick=getattr(args, "quick", False)
        )
        if args.ray_address:
            runs_on = cfg.study or cfg.robustness
            if cfg.executor != "ray" and getattr(runs_on, "backend", None) != "ray":
                raise config.ConfigError(
                    "--ray-address applies to executor ray (--set executor=ray) and to a study or robustness "
                    "matrix on backend ray (--set study.backend=ray)"
                )
            cfg = cfg.model_copy(update={"ray_address": args.ray_address})
        runs = [cfg.run(args.run).name] if args.command == "simulate" else None
        if args.command == "compare" and cfg.study is not None:
            from asyncfl.study import run_study  # a study: grids, seeds and ratios (asyncfl.study)

            if args.seed is not None:
                raise config.ConfigError(
                    "--seed does not apply to a study: its seeds are study.seeds (e.g. --set 'study.seeds=[3, 4, 5]')"
                )

            run_study(cfg, args.out, console, threads)
            return 0
        if args.command == "compare" and cfg.robustness is not None:
            from asyncfl.robustness.runner import run_robustness  # attacks x defences

            if args.seed is not None:
                raise config.ConfigError(
                    "--seed does not apply to a robustness matrix: its seeds are robustness.seeds "
                    "(e.g. --set 'robustness.seeds=[3, 4, 5]')"
                )
            run_robustness(cfg, args.out, console, threads)
            return 0
        run_experiment(cfg, args.out, runs, console, threads)
    except config.ConfigError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

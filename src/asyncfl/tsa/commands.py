"""The `tsa init` and `tsa serve` commands (imported by cli.py only when they run)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from asyncfl.config import ConfigError

TOKEN_ENV = "ASYNCFL_TSA_TOKEN"


def read_token(token_file: Path | None) -> str:
    """The bearer token the FL server and the TSA share: a file, else $ASYNCFL_TSA_TOKEN."""
    token = token_file.read_text().strip() if token_file is not None else os.environ.get(TOKEN_ENV, "")
    if len(token) < 16:
        raise ConfigError(f"give the shared token (16+ characters) with --token-file or ${TOKEN_ENV}")
    return token


def tsa(args) -> int:
    from asyncfl.tsa.state import init_state

    if args.tsa_command == "init":
        print(init_state(args.state))
        return 0
    return _serve(args)


def _serve(args) -> int:
    import uvicorn
    from uvicorn.config import LOG_LEVELS

    from asyncfl.secagg.tsa import TrustedAggregator
    from asyncfl.tsa.app import create_tsa_app
    from asyncfl.tsa.state import load_key_pair, open_store

    logging.basicConfig(level=LOG_LEVELS[args.log_level], format="%(asctime)s %(name)s %(levelname)s %(message)s")
    terms = _terms(args)
    token = read_token(args.token_file)
    key_pair = load_key_pair(args.state)
    aggregator = TrustedAggregator(
        key_pair,
        open_store(args.state),
        args.task,
        terms["length"],
        terms["min_contributions"],
        terms["max_weight"],
        terms["bits"],
        terms["noise_std"],
    )
    print(
        f"asyncfl tsa: task {args.task!r}, {terms}, http://{args.host}:{args.port}/ (public key "
        f"{aggregator.public_key.hex()[:16]}...)",
        flush=True,
    )
    uvicorn.run(create_tsa_app(aggregator, token), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _terms(args) -> dict:
    """Length, K, max weight, bits and DP noise: from the experiment config's run (what the FL
    server derives from the same config, server/tsa_buffer.py), else from the flags (no noise)."""
    flags = {
        "length": args.length,
        "min_contributions": args.min_contributions,
        "max_weight": args.max_weight,
        "bits": args.bits,
    }
    if args.config is not None:
        if any(v is not None for v in flags.values()):
            raise ConfigError("give --config or --length/--min-contributions/--max-weight/--bits, not both")
        from asyncfl.server.settings import load_serve_config
        from asyncfl.server.tsa_buffer import tsa_terms_of

        cfg, settings = load_serve_config(args.config, args.overrides)
        terms = tsa_terms_of(cfg, settings, args.run)
        return {
            "length": terms.length,
            "min_contributions": terms.buffer_size,
            "max_weight": terms.max_weight,
            "bits": terms.bits,
            "noise_std": terms.noise_std_in_ring,
        }
    missing = [k for k, v in flags.items() if v is None and k != "bits"]
    if missing:
        raise ConfigError(f"give --config, or --{' --'.join(m.replace('_', '-') for m in missing)}")
    return flags | {"bits": args.bits or 32, "noise_std": 0.0}

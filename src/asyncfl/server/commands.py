"""The `serve` and `token` commands (imported by cli.py only when they run, so the simulator's
commands do not load the web stack)."""

from __future__ import annotations

import logging
import time

from asyncfl.config import ConfigError


def serve(args) -> int:
    if args.role != "server":
        from asyncfl.cluster.commands import serve_role

        return serve_role(args)
    if args.config is None:
        raise ConfigError("asyncfl serve needs --config (the multi-process roles read their tasks from --database-url)")
    import torch
    from uvicorn.config import LOG_LEVELS

    from asyncfl.server.app import create_app
    from asyncfl.server.limits import serve_http
    from asyncfl.server.service import FLServer
    from asyncfl.server.settings import load_serve_config

    torch.set_num_threads(1)
    # by number: uvicorn names its TRACE level only once it configures logging, after this
    logging.basicConfig(level=LOG_LEVELS[args.log_level], format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg, settings = load_serve_config(args.config, args.overrides, args.server_config, args.seed)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ConfigError("give both --ssl-certfile and --ssl-keyfile for TLS")
    server = FLServer(cfg, settings, args.state_dir, args.run)
    scheme = "https" if args.ssl_certfile else "http"
    print(
        f"asyncfl server: task {server.task!r}, version {server.aggregation.state.version}, "
        f"{scheme}://{args.host}:{args.port}/",
        flush=True,
    )
    serve_http(create_app(server), args, settings)
    return 0


def token(args) -> int:
    if args.token_command in ("create", "revoke", "rotate-key") and args.database_url:
        from asyncfl.cluster.commands import token_create, token_revoke, token_rotate_key

        return {"create": token_create, "revoke": token_revoke, "rotate-key": token_rotate_key}[args.token_command](
            args
        )
    if args.token_command == "rotate-key":
        raise ConfigError("signing keys are the cluster's: give --database-url (or set $ASYNCFL_DATABASE_URL)")
    from asyncfl.server.auth import ANY_TASK, CLIENT, OPERATOR, new_token
    from asyncfl.server.store import Store

    store = Store(args.state_dir)
    try:
        if args.token_command == "create":
            if args.task is None and not args.operator:
                raise ConfigError("a client token needs --task")
            tok = new_token()
            store.create_token(tok, args.client, args.task or ANY_TASK, OPERATOR if args.operator else CLIENT)
            print(tok)
        elif args.token_command == "list":
            for client, task, created, revoked, role in store.list_tokens():
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
                print(f"{client}\t{task}\t{when}\t{'revoked' if revoked else 'active'}\t{role}")
        else:
            print(f"revoked {store.revoke_client(args.client)} token(s) of {args.client}")
    finally:
        store.close()
    return 0

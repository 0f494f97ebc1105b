"""The `client` command (imported by cli.py only when it runs)."""

from __future__ import annotations

import os
import ssl
import sys
import time


def client(args) -> int:
    import torch

    from asyncfl.attacks import Attack
    from asyncfl.client.http import Backoff, ServerApi, TlsError, UnsafeUrl, check_server_url
    from asyncfl.client.runtime import ClientError, ClientRuntime, load_hook

    torch.set_num_threads(args.threads)
    token = args.token or os.environ.get("ASYNCFL_TOKEN")
    if not token:
        print("error: give --token or set ASYNCFL_TOKEN", file=sys.stderr)
        return 2
    try:
        check_server_url(args.server, args.insecure)
    except UnsafeUrl as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    verify = False if args.insecure else (ssl.create_default_context(cafile=args.ca_cert) if args.ca_cert else True)
    api = ServerApi(args.server, token, verify=verify, backoff=Backoff(cap=args.backoff_cap))
    try:
        attack = (
            None
            if args.attack is None
            else Attack(args.attack, args.attack_factor, args.attack_noise_std, args.attack_seed)
        )
    except ValueError as err:
        print(f"error: --{err}", file=sys.stderr)
        return 2
    t0 = time.time()
    rt = ClientRuntime(
        api,
        args.data,
        load_hook(args.eligibility),
        args.ack_log,
        args.max_trips,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        state_path=args.state,
        attack=attack,
        tsa_key=args.tsa_key,
    )
    try:
        stats = rt.run()
    except (ClientError, TlsError, UnsafeUrl) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        api.close()
    print(f"client done in {time.time() - t0:.1f} s: {stats} ({api.retries} retries)", flush=True)
    return 0

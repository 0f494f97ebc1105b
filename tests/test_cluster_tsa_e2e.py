"""The multi-process server with secure aggregation, end to end: every role a real process, a
real `asyncfl tsa serve`, and `asyncfl client --tsa-key` processes training masked FedBuff;
kill -9 of the aggregator that owns the task hands it to the other one, training goes on, and
every update a client was told was accepted is in exactly one closed buffer and one version."""

import copy
import json

import pytest
import yaml
from cluster_helpers import fetch
from test_cluster_e2e import CLIENTS, Cluster, K, _healthy, _task, _until, kill_the_owner
from test_cluster_e2e import EXPERIMENT as PLAIN

from asyncfl.cluster.members import session
from asyncfl.cluster.postgres import free_port
from asyncfl.cluster.tasks import add_task, create_token
from asyncfl.config import validate
from asyncfl.tsa.testing import TsaProcess

# the plain end-to-end test's task, masked for the TSA
EXPERIMENT = copy.deepcopy(PLAIN) | {"name": "e2e-tsa"}
EXPERIMENT["runs"][0]["secure_aggregation"] = {"protocol": "tsa", "clip_range": 1.0}


@pytest.mark.slow
def test_cluster_trains_masked_fedbuff_and_survives_kill_9(pg_url, tmp_path):
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(yaml.safe_dump(EXPERIMENT))
    tsa = TsaProcess(tmp_path, "fedbuff", config_path)
    experiment = EXPERIMENT | {"server": EXPERIMENT["server"] | tsa.server_settings()}
    with session(pg_url) as conn:
        add_task(conn, validate(experiment))
        tokens = [create_token(conn, f"c{i}", "fedbuff") for i in range(CLIENTS)]
    cluster = Cluster(pg_url, tmp_path)
    tsa.start()
    try:
        aggregators = [cluster.role("aggregator"), cluster.role("aggregator")]
        cluster.role("coordinator")
        port = free_port()
        cluster.role("selector", "--port", str(port))
        _until(lambda: _healthy(port), "the selector")
        for i, token in enumerate(tokens):
            cluster.spawn(
                f"client{i}",
                "client",
                "--server",
                f"http://127.0.0.1:{port}",
                "--token",
                token,
                "--tsa-key",
                tsa.public_key,
                "--data",
                f"digits:client={i}",
                "--ack-log",
                str(tmp_path / f"acks{i}.jsonl"),
                "--backoff-cap",
                "1",
            )
        _until(lambda: _task(pg_url)[2] >= 3, "version 3")
        kill_the_owner(pg_url, aggregators)
        for p in cluster.procs:
            if "client" in p.args:
                p.terminate()
        _until(
            lambda: (
                fetch(pg_url, "SELECT count(*) FROM partials WHERE tsa_step IS NOT NULL AND folded_version IS NULL")
                == [(0,)]
            ),
            "the last closed buffer to step",
        )
    finally:
        cluster.stop()
        tsa.kill()

    logs = [tmp_path / f"acks{i}.jsonl" for i in range(CLIENTS)]
    acks = [json.loads(line) for log in logs if log.exists() for line in open(log)]  # some may never get a slot
    accepted = {a["key"] for a in acks if a["http"] == 200}
    assert len(accepted) > 3 * K
    logged = fetch(pg_url, "SELECT idem_key, partial_id FROM updates WHERE task = 'fedbuff' AND status = 200")
    assert accepted <= {key for key, _ in logged} and len(logged) == len({key for key, _ in logged})
    folded = fetch(pg_url, "SELECT coalesce(sum(count), 0) FROM partials WHERE folded_version IS NOT NULL")[0][0]
    in_versions = fetch(pg_url, "SELECT coalesce(sum(updates), 0) FROM versions WHERE task = 'fedbuff'")[0][0]
    steps = fetch(pg_url, "SELECT count(DISTINCT tsa_step) FROM partials WHERE folded_version IS NOT NULL")[0][0]
    assert in_versions == folded and steps == _task(pg_url)[2]  # one closed buffer per version, each once
    assert fetch(pg_url, "SELECT count(*) FROM partials WHERE discarded > 0") == [(0,)]

"""The secagg preset (`--quick`): secure runs cost more bytes than their plaintext twins, learn
as well, and a sync round with too few survivors is lost and counted."""

import json

from asyncfl.cli import main

TWINS = {"fedavg_secagg_plus": "fedavg", "fedavg_secagg_t90": "fedavg_timeout", "fedbuff_tsa": "fedbuff"}


def test_secagg_preset_quick(tmp_path):
    assert main(["compare", "--preset", "secagg", "--quick", "--out", str(tmp_path)]) == 0
    runs = {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())["runs"]}
    assert set(runs) == set(TWINS) | set(TWINS.values())
    for secure, plain in TWINS.items():
        s, p = runs[secure], runs[plain]
        assert s["secure_aggregation"] and p.get("secure_aggregation") is None
        assert s["upload_payload_bytes"] > p["upload_payload_bytes"]
        assert s["bytes_up"] + s["bytes_down"] > p["bytes_up"] + p["bytes_down"]
    for secure, plain in (("fedavg_secagg_plus", "fedavg"), ("fedbuff_tsa", "fedbuff")):
        assert abs(runs[secure]["final_accuracy"] - runs[plain]["final_accuracy"]) <= 0.03
        assert runs[secure]["final_accuracy"] >= 0.8
    # t = 18 of 20 at 10 % dropout and a 30 s timeout: some rounds cannot unmask; they take no step and are counted
    strict = runs["fedavg_secagg_t90"]
    assert strict["secagg_threshold"] == 18 and strict["secagg_failed_rounds"] >= 1
    assert strict["server_steps"] < runs["fedavg_timeout"]["server_steps"]
    assert runs["fedavg_secagg_plus"]["secagg_failed_rounds"] == 0
    assert runs["fedbuff_tsa"]["tsa_requests"] == runs["fedbuff_tsa"]["server_steps"]

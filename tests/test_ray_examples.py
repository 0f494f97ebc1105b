"""The example Ray cluster configs parse and set up and run asyncfl as the README says."""

from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ray"


def test_the_cluster_launcher_config_installs_asyncfl_with_the_ray_extra_and_pinned_torch():
    cfg = yaml.safe_load((EXAMPLES / "cluster.yaml").read_text())
    assert cfg["provider"]["type"] and cfg["cluster_name"]
    setup = " ".join(cfg["setup_commands"])
    assert "asyncfl[ray]" in setup and '"torch==2.13.0"' in setup
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


def test_the_kuberay_manifests_run_asyncfl_compare_on_their_raycluster():
    text = (EXAMPLES / "kuberay.yaml").read_text()
    assert "asyncfl[ray]" in text  # the image it names is built with the extra
    cluster, job = yaml.safe_load_all(text)
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    command = job["spec"]["entrypoint"].split()
    assert command[:4] == ["asyncfl", "compare", "--preset", "quickstart"]
    assert "executor=ray" in command and command[command.index("--ray-address") + 1] == "auto"
    assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] >= 1

"""One seed derivation: a served run's n-th lease trains with the simulator's n-th trip seed."""

from types import SimpleNamespace

import numpy as np
import torch

from asyncfl.algorithms.seeds import download_rounding_generator, trip_seed, upload_rounding_generator
from asyncfl.algorithms.shuffle import mix
from asyncfl.experiment import build_simulation
from asyncfl.scheduling import AsyncPolicy
from asyncfl.server.coordinator import Coordinator
from asyncfl.server.store import Store


def simulated_trip_seeds(cfg, n):
    sim = build_simulation(cfg, cfg.run("fedbuff"))
    seeds, submit = [], sim.executor.submit

    def recording(job):
        seeds.append(job.seed)
        return submit(job)

    sim.executor.submit = recording
    sim.run()
    return seeds[:n]


def served_lease_seeds(seed, n, tmp_path):
    aggregation = SimpleNamespace(state=SimpleNamespace(version=0))
    co = Coordinator(policy=AsyncPolicy(n), aggregation=aggregation, lease_timeout=60.0, seed=seed)
    co.request_clients(n)
    return co, [co.claim(f"c{i}").seed for i in range(n)]


def test_the_nth_lease_gets_the_seed_of_the_nth_simulated_trip(small, tmp_path):
    cfg = small(seed=7)
    _, served = served_lease_seeds(7, 6, tmp_path)
    assert served == simulated_trip_seeds(cfg, 6)
    assert served == [int(mix(7, k)[0]) for k in range(6)]  # trips numbered from 0


def test_seeds_above_the_signed_64_bit_range_survive_a_restart(tmp_path):
    co, seeds = served_lease_seeds(7, 20, tmp_path)
    assert max(seeds) >= 1 << 63  # half of all uint64 seeds: SQLite's INTEGER is signed
    store = Store(tmp_path / "state")
    with store.transaction() as db:
        Coordinator.persist(co.snapshot(), db)
    again = Coordinator(policy=co.policy, aggregation=co.aggregation, lease_timeout=60.0, seed=7)
    again.restore(store)
    assert sorted(lease.seed for lease in again.leases.values()) == sorted(seeds)
    store.close()


def test_rounding_generators_keep_the_simulators_streams():
    seed = int(trip_seed(3, 11)[0])
    old_upload = torch.Generator().manual_seed((seed ^ 0xC0DEC) & (2**63 - 1))
    assert torch.equal(upload_rounding_generator(seed).get_state(), old_upload.get_state())
    old_download = torch.Generator().manual_seed(int(mix(3, 5, 0xD0)[0]) & (2**63 - 1))
    assert torch.equal(download_rounding_generator(3, 5).get_state(), old_download.get_state())
    assert np.array_equal(trip_seed(3, np.arange(4)), mix(3, np.arange(4)))

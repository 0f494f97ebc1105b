import json
import math

import dp_accounting
import pytest
import torch

from asyncfl.privacy import (
    Accountant,
    AdaptiveClipping,
    add_gaussian_noise,
    clip,
    epsilon,
    noise_multiplier_for,
    noise_std,
    update_noise_multiplier,
)


def reference_epsilon(sigma, q, steps, delta):
    """dp-accounting's RDP accountant, driven directly."""
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


# ------------------------------------------------------------------ accountant


@pytest.mark.parametrize(
    "sigma, q, steps, delta",
    [
        (1.1, 0.01, 1000, 1e-5),
        (0.8, 0.05, 200, 1e-6),
        (2.0, 1.0, 50, 1e-5),
        (5.0, 0.001, 10_000, 1e-5),
        (0.5, 0.2, 3, 1e-3),
    ],
)
def test_epsilon_matches_dp_accounting(sigma, q, steps, delta):
    ours = epsilon(sigma, q, steps, delta)
    assert ours == pytest.approx(reference_epsilon(sigma, q, steps, delta), rel=1e-9)
    acc = Accountant(sigma, q)
    for _ in range(3):
        acc.step()
    acc.step(steps - 3)
    assert acc.steps == steps
    assert acc.epsilon(delta) == pytest.approx(ours, rel=1e-9)


def test_known_value_sanity():
    # the classic DP-SGD MNIST setting (q = 256/60000, sigma = 1.1, 60 epochs) is epsilon ~ 3
    steps = int(60 * 60000 / 256)
    assert 2.5 < epsilon(1.1, 256 / 60000, steps, 1e-5) < 3.5


def test_epsilon_monotone_in_steps_sigma_and_rate():
    eps_steps = [epsilon(1.0, 0.02, s, 1e-5) for s in (1, 10, 100, 1000, 5000)]
    assert eps_steps == sorted(eps_steps) and len(set(eps_steps)) == len(eps_steps)
    eps_sigma = [epsilon(s, 0.02, 500, 1e-5) for s in (0.6, 0.8, 1.0, 2.0, 4.0)]
    assert eps_sigma == sorted(eps_sigma, reverse=True) and len(set(eps_sigma)) == len(eps_sigma)
    eps_q = [epsilon(1.0, q, 500, 1e-5) for q in (0.001, 0.01, 0.1, 1.0)]
    assert eps_q == sorted(eps_q)
    assert epsilon(1.0, 0.02, 500, 1e-7) > epsilon(1.0, 0.02, 500, 1e-3)


def test_zero_steps_is_zero_epsilon():
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert Accountant(1.0, 0.1).epsilon(1e-5) == 0.0
    assert Accountant(1.0, 0.1).step(0).steps == 0


def test_accountant_changing_parameters_and_state_roundtrip():
    acc = Accountant(1.2, 0.01)
    acc.step(300)
    acc.step(200, noise_multiplier=0.9)
    acc.step(100, sample_rate=0.02)
    ref = dp_accounting.rdp.RdpAccountant()
    for sigma, q, n in [(1.2, 0.01, 300), (0.9, 0.01, 200), (0.9, 0.02, 100)]:
        ref.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    assert acc.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    state = json.loads(json.dumps(acc.state_dict()))  # plain JSON
    restored = Accountant(5.0, 0.5)
    restored.load_state_dict(state)
    assert restored.steps == 600 and restored.epsilon(1e-5) == acc.epsilon(1e-5)
    restored.step(10)
    acc.step(10)
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
    with pytest.raises(ValueError, match="segment"):
        restored.load_state_dict({"noise_multiplier": 1.0, "sample_rate": 0.1, "segments": [[1.0, 0.1]]})
    with pytest.raises(ValueError, match="sample rate"):
        restored.load_state_dict({"noise_multiplier": 1.0, "sample_rate": 0.1, "segments": [[1.0, 2.0, 3]]})


@pytest.mark.parametrize(
    "args, message",
    [
        ((0.0, 0.1, 10, 1e-5), "noise multiplier"),
        ((-1.0, 0.1, 10, 1e-5), "noise multiplier"),
        ((float("nan"), 0.1, 10, 1e-5), "noise multiplier"),
        ((float("inf"), 0.1, 10, 1e-5), "noise multiplier"),
        ((1.0, 0.0, 10, 1e-5), "sample rate"),
        ((1.0, 1.5, 10, 1e-5), "sample rate"),
        ((1.0, -0.1, 10, 1e-5), "sample rate"),
        ((1.0, float("nan"), 10, 1e-5), "sample rate"),
        ((1.0, 0.1, -1, 1e-5), "steps"),
        ((1.0, 0.1, 2.5, 1e-5), "steps"),
        ((1.0, 0.1, True, 1e-5), "steps"),
        ((1.0, 0.1, 10, 0.0), "delta"),
        ((1.0, 0.1, 10, 1.0), "delta"),
        ((1.0, 0.1, 10, -1e-5), "delta"),
        ((1.0, 0.1, 10, "1e-5"), "delta"),
    ],
)
def test_invalid_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        epsilon(*args)


def test_accountant_invalid_inputs():
    with pytest.raises(ValueError, match="noise multiplier"):
        Accountant(0.0, 0.1)
    with pytest.raises(ValueError, match="sample rate"):
        Accountant(1.0, 0.0)
    acc = Accountant(1.0, 0.1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        acc.step(-1)
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon(1.5)
    with pytest.raises(ValueError, match="noise multiplier"):
        acc.step(noise_multiplier=-2)


def test_noise_multiplier_calibration():
    sigma = noise_multiplier_for(2.0, 0.01, 1000, 1e-5)
    assert epsilon(sigma, 0.01, 1000, 1e-5) <= 2.0
    assert epsilon(sigma * 0.99, 0.01, 1000, 1e-5) > 2.0
    with pytest.raises(ValueError, match="target epsilon"):
        noise_multiplier_for(0.0, 0.01, 10, 1e-5)


# ------------------------------------------------------------------ clipping and noise


def test_clip_bounds_the_norm_and_reports_the_original():
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        d = torch.randn(1000, generator=g) * scale
        clipped, norm = clip(d, 5.0)
        assert norm == pytest.approx(float(d.norm()), rel=1e-6)
        assert float(clipped.norm()) <= 5.0 * (1 + 1e-6)
        if norm > 5.0:
            assert float(clipped.norm()) == pytest.approx(5.0, rel=1e-6)
            assert torch.allclose(clipped / clipped.norm(), d / d.norm())  # direction kept


def test_clip_leaves_small_updates_unchanged():
    d = torch.tensor([0.3, -0.4])  # norm 0.5
    clipped, norm = clip(d, 1.0)
    assert clipped is d and norm == pytest.approx(0.5)
    clipped, norm = clip(d, 0.5)  # exactly on the bound
    assert torch.equal(clipped, d)
    zero, norm = clip(torch.zeros(3), 1.0)
    assert norm == 0.0 and torch.equal(zero, torch.zeros(3))
    d64 = torch.tensor([3.0, 4.0], dtype=torch.float64)
    clipped, _ = clip(d64, 1.0)
    assert clipped.dtype == torch.float64 and torch.allclose(clipped, torch.tensor([0.6, 0.8], dtype=torch.float64))


def test_clip_validation():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clip norm"):
            clip(torch.ones(2), bad)
    with pytest.raises(ValueError, match="non-finite norm"):
        clip(torch.tensor([1.0, float("nan")]), 1.0)


def test_noise_std_matches_sigma_times_clip():
    total = torch.zeros(400_000)
    g = torch.Generator().manual_seed(0)
    noisy = add_gaussian_noise(total, 1.3, 0.7, generator=g)
    # the sample std of n normals has relative std 1/sqrt(2n) ~ 0.0011: 1% is > 8 sigma
    assert float(noisy.std()) == pytest.approx(1.3 * 0.7, rel=0.01)
    assert abs(float(noisy.mean())) < 5 * 1.3 * 0.7 / math.sqrt(400_000)
    assert torch.equal(total, torch.zeros(400_000))  # input untouched
    weighted = add_gaussian_noise(total, 1.3, 0.7, max_weight=0.5, generator=g)
    assert float(weighted.std()) == pytest.approx(1.3 * 0.7 * 0.5, rel=0.01)
    assert noise_std(1.3, 0.7, 0.5) == pytest.approx(0.455)


def test_noise_is_deterministic_with_a_generator_and_keeps_dtype():
    t = torch.ones(100, dtype=torch.float64)
    a = add_gaussian_noise(t, 1.0, 1.0, generator=torch.Generator().manual_seed(3))
    b = add_gaussian_noise(t, 1.0, 1.0, generator=torch.Generator().manual_seed(3))
    c = add_gaussian_noise(t, 1.0, 1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.float64
    plain = add_gaussian_noise(t, 0.0, 1.0)
    assert torch.equal(plain, t) and plain is not t
    with pytest.raises(ValueError, match="noise multiplier"):
        add_gaussian_noise(t, -1.0, 1.0)
    with pytest.raises(ValueError, match="max_weight"):
        add_gaussian_noise(t, 1.0, 1.0, max_weight=0.0)


def test_noisy_average_of_a_buffer():
    # FedBuff-style: K clipped updates summed, noised once, divided by the fixed K
    K, C, z = 10, 1.0, 1.0
    g = torch.Generator().manual_seed(1)
    updates = [torch.randn(50_000, generator=g) * 0.01 for _ in range(K)]
    total = sum(clip(u, C)[0] for u in updates)
    avg = add_gaussian_noise(total, z, C, generator=g) / K
    assert float((avg - total / K).std()) == pytest.approx(z * C / K, rel=0.02)


# ------------------------------------------------------------------ adaptive clipping


def test_update_noise_multiplier_splits_the_budget():
    z, sb = 1.0, 5.0
    zd = update_noise_multiplier(z, sb)
    assert zd > z
    assert (zd**-2 + (2 * sb) ** -2) ** -0.5 == pytest.approx(z)
    assert update_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="too small"):
        update_noise_multiplier(1.0, 0.5)


@pytest.mark.parametrize(
    "quantile, start, count_noise", [(0.5, 0.01, 0.0), (0.5, 100.0, 5.0), (0.9, 1.0, 5.0), (0.2, 10.0, 0.0)]
)
def test_adaptive_clipping_converges_to_the_target_quantile(quantile, start, count_noise):
    # norms ~ lognormal(0, 1): the q-quantile is exp(Phi^-1(q))
    m = 100
    ac = AdaptiveClipping(
        start, target_quantile=quantile, learning_rate=0.2, expected_count=m, count_noise_std=count_noise
    )
    g = torch.Generator().manual_seed(0)
    logs = []
    for r in range(600):
        norms = torch.randn(m, generator=g).exp()
        ac.update(norms, generator=g)
        if r >= 400:
            logs.append(math.log(ac.clip_norm))
    c = math.exp(sum(logs) / len(logs))
    reached = 0.5 * (1 + math.erf(math.log(c) / math.sqrt(2)))  # lognormal CDF at C
    assert reached == pytest.approx(quantile, abs=0.05)


def test_adaptive_clipping_direction_bounds_and_state():
    ac = AdaptiveClipping(1.0, target_quantile=0.5, learning_rate=0.2, expected_count=4)
    assert ac.update([10.0, 10.0, 10.0, 10.0]) == pytest.approx(math.exp(0.1))  # all clipped: grow
    ac = AdaptiveClipping(1.0, target_quantile=0.5, learning_rate=0.2, expected_count=4)
    assert ac.update([0.1] * 4) == pytest.approx(math.exp(-0.1))  # none clipped: shrink
    ac = AdaptiveClipping(1.0, expected_count=4, max_clip=1.01)
    assert ac.update([10.0] * 4) == 1.01
    ac2 = AdaptiveClipping(5.0)
    ac2.load_state_dict(json.loads(json.dumps(ac.state_dict())))
    assert ac2.clip_norm == 1.01
    for kwargs, message in [
        ({"target_quantile": 1.5}, "target_quantile"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"expected_count": 0}, "expected_count"),
        ({"count_noise_std": -1}, "count_noise_std"),
    ]:
        with pytest.raises(ValueError, match=message):
            AdaptiveClipping(1.0, **kwargs)


@pytest.mark.parametrize(
    "norms, noise_seed, fraction",
    [
        ([0.1] * 8, None, 1.0),  # 8 updates under C where 4 were expected: 4 / 4 + 1/2 = 1.5
        ([10.0] * 8, None, 0.0),  # 8 over C: -4 / 4 + 1/2 = -0.5
        ([0.1, 0.1, 10.0, 10.0], 0, 1.0),  # seed 0 draws +1.54: 1/2 + 154 / 4
        ([0.1, 0.1, 10.0, 10.0], 4, 0.0),  # seed 4 draws -1.61: 1/2 - 161 / 4
    ],
)
def test_adaptive_clipping_estimate_is_clamped_to_a_fraction(norms, noise_seed, fraction):
    """An estimate outside [0, 1] moves C as the nearest possible fraction would."""
    ac = AdaptiveClipping(
        1.0,
        target_quantile=0.5,
        learning_rate=0.2,
        expected_count=4,
        count_noise_std=0.0 if noise_seed is None else 100.0,
    )

    def gen():
        return None if noise_seed is None else torch.Generator().manual_seed(noise_seed)

    assert ac.noisy_fraction(norms, gen()) == fraction
    assert ac.update(norms, gen()) == pytest.approx(math.exp(-0.2 * (fraction - 0.5)), rel=1e-12)


def test_adaptive_clipping_count_noise_is_seeded():
    a = AdaptiveClipping(1.0, expected_count=10, count_noise_std=2.0)
    b = AdaptiveClipping(1.0, expected_count=10, count_noise_std=2.0)
    norms = [0.5] * 5 + [5.0] * 5  # half under C: the noisy estimate stays inside [0, 1]
    assert a.update(norms, torch.Generator().manual_seed(1)) == b.update(norms, torch.Generator().manual_seed(1))
    assert a.update(norms, torch.Generator().manual_seed(1)) != b.update(norms, torch.Generator().manual_seed(2))

import math

import pytest

from asyncfl.algorithms import staleness


def test_constant_is_one_everywhere():
    s = staleness.constant()
    assert [s(d) for d in (0, 1, 7, 1000)] == [1.0] * 4


def test_polynomial_matches_hand_values():
    s = staleness.polynomial(0.5)
    assert s(0) == 1.0
    assert s(3) == pytest.approx(0.5)  # (3 + 1)^-0.5
    assert s(8) == pytest.approx(1 / 3)  # 9^-0.5
    assert staleness.polynomial(2.0)(1) == pytest.approx(0.25)


def test_hinge_is_flat_up_to_b_then_decays():
    s = staleness.hinge(a=10, b=4)
    assert [s(d) for d in range(5)] == [1.0] * 5
    assert s(5) == pytest.approx(1 / 11)  # 1 / (10 * 1 + 1)
    assert s(16) == pytest.approx(1 / 121)  # 1 / (10 * 12 + 1)


def test_inverse_sqrt_is_fedbuff_default():
    s = staleness.inverse_sqrt()
    assert s(0) == 1.0
    assert s(3) == pytest.approx(0.5)
    assert s(8) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: staleness.polynomial(0),
        lambda: staleness.hinge(0, 1),
        lambda: staleness.hinge(1, -1),
        lambda: staleness.make("exp"),
    ],
)
def test_bad_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        bad()


def test_make_dispatches():
    assert staleness.make("hinge", a=2, b=1)(3) == pytest.approx(1 / 5)
    assert staleness.make("inverse_sqrt")(15) == pytest.approx(0.25)
    assert math.isclose(staleness.make("polynomial", a=1)(1), 0.5)

"""Restoring a server optimizer's state saved before its first step leaves no moments behind:
a refused first step (non-finite) must not poison the steps after it."""

import pytest
import torch

from asyncfl.algorithms.server_opt import SGD, Adaptive


@pytest.mark.parametrize("opt", [SGD(lr=1.0, momentum=0.9), Adaptive("adam", lr=0.1)])
def test_state_before_the_first_step_restores_to_no_moments(opt):
    fresh = opt.state_dict()
    opt.step(torch.zeros(3), torch.full((3,), torch.inf))  # a step the server refuses
    opt.load_state_dict(fresh)
    w = opt.step(torch.zeros(3), torch.ones(3))
    assert torch.isfinite(w).all()
    assert opt.m is not None and torch.isfinite(opt.m).all()

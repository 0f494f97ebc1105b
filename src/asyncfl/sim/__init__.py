"""Discrete-event simulation: virtual clock, device population, deferred client execution."""

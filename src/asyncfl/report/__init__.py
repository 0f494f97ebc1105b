"""Metrics, tables and plots of simulation runs."""

"""The network server: selector, coordinator and aggregator roles over a durable store,
served over HTTP by app.py. Algorithms come from asyncfl.algorithms and asyncfl.scheduling."""

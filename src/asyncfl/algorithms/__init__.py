"""Pure federated-learning math on flat tensors: trainer, aggregators, staleness, optimizers."""

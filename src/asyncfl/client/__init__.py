"""The client runtime: check in, download, train with the shared LocalTrainer, upload, repeat."""

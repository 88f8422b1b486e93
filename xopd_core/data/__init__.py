"""Data: manifests, audio I/O, the mini-world generator and dataset validation."""

"""Fingerprints (mergeable statistics), their federated merge, and nnU-Net-style planning."""

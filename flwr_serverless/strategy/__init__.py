"""Aggregation: pure weighted-sum kernels and the Flower strategies the nodes run client-side."""

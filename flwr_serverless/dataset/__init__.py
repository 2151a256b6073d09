"""0.2's ``flwr_serverless.dataset`` package (one descriptive dataclass)."""

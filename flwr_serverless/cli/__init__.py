"""The ``flwr-serverless`` command line: simulate, inspect, clean."""

from flwr_serverless.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

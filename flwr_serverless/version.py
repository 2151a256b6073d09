"""``from flwr_serverless.version import __version__`` (0.2's module); the version itself lives in the package."""

from flwr_serverless import __version__

__all__ = ["__version__"]

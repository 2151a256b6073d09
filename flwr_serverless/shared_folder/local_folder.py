"""0.2's local folders: ``LocalFolder`` and ``LocalFolderWithBytes`` are one bytes folder on disk."""

from flwr_serverless.stores.legacy import LocalFolder, NotBytesError

__all__ = ["LocalFolder", "LocalFolderWithBytes", "NotBytesError"]

LocalFolderWithBytes = LocalFolder

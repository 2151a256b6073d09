"""0.2's S3 folders: ``S3FolderWithBytes`` is :class:`~flwr_serverless.stores.S3Folder`; nothing pickles."""

from __future__ import annotations

import warnings
from typing import Any

from flwr_serverless.stores.legacy import NotBytesError, S3Folder

__all__ = ["NotBytesError", "S3Folder", "S3FolderWithBytes", "S3FolderWithPickle"]

S3FolderWithBytes = S3Folder


class S3FolderWithPickle(S3Folder):
    """The name of 0.2's pickling S3 folder; here it stores bytes like every folder.

    It still opens and passes to nodes (which write bytes), and ``get_raw_folder()``
    works; storing anything but bytes raises ``NotBytesError`` saying what to use.
    """

    def __init__(self, directory: str | None = None, check_at_init: bool = True, **kwargs: Any) -> None:
        warnings.warn(
            "S3FolderWithPickle stores bytes only (flwr-serverless 0.3 never pickles); use S3Folder",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(directory, check_at_init=check_at_init, **kwargs)

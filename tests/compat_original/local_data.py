"""``mnist.load_data()`` without the download, for the original tests (see NOTICE.md)."""

from __future__ import annotations

from types import SimpleNamespace

from flwr_serverless.keras.example import load_mnist

mnist = SimpleNamespace(load_data=load_mnist)

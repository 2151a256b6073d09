"""flwr-serverless 0.2's folder modules, kept so ``flwr_serverless.shared_folder.*`` imports keep working.

Every class here is a store from :mod:`flwr_serverless.stores` with the 0.2 dict-like
interface (see :class:`flwr_serverless.stores.legacy.SharedFolder`); values are bytes.
"""

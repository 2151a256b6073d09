"""flwr-serverless 0.2's node modules: thin subclasses of the nodes in :mod:`flwr_serverless.nodes`.

They add 0.2's constructor arguments (``shared_folder`` first, ``ignore_seen_models``, a
required ``num_nodes`` for sync), ``update_parameters``' 0.2 argument order and
``upload_only``, the ``model_store``/``counter``/``seen_models`` attributes and the
``num_examples``/``num_nodes`` aggregated metrics; the core nodes (``flwr_serverless.node``)
know none of them. See docs/migrating.md.
"""

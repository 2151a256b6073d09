"""Pure decisions of each mode (no store access): which peers to read, when to aggregate, with what weights.

* ``asynchronous``: FedAvgAsync and its staleness-aware variants (FedRec, FedAsync, FedBuff).
* ``synchronous``: the round barrier over live members; where a (re)joining node enters.
* ``semisync``: SemiSync's plan (``t_max``, step budgets) and its dataset-size weights.
"""

"""The paper-reproduction harness (``make paper``): kept out of the wheel, like Flower's baselines."""

"""The wire format: what an object in the store is (codec, header, compression, key layout)."""

"""The benchmark harness: the same timing loop for every artifact and backend."""

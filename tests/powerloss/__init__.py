"""Power-loss testing of the store: write recorder, workload, replay of cut logs."""

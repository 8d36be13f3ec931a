"""Records -> validation -> rendering (ids, labels) -> batches."""

"""tfmet.metrics."""

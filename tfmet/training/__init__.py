"""tfmet.training."""

"""tfmet.data."""

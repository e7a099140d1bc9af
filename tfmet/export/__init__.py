"""tfmet.export."""

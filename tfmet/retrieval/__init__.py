"""tfmet.retrieval."""

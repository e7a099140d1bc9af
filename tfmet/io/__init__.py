"""Safe file I/O: atomic writes and restricted unpickling."""

"""Formatting for progress reports of long work (extraction, training)."""

import math


def format_seconds(seconds):
    """H:MM:SS, or "?" for an unknown (infinite or NaN) duration."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

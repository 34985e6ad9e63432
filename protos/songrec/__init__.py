"""songrec package."""

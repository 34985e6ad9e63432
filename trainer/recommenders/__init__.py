"""Playlist-continuation models behind one interface (trainer.recommenders.base)."""

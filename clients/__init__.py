"""Clients of the songrec gRPC API: the typed client, its CLI, the load test and the serving
benchmark."""

from clients.client import (
    AsyncSongRecClient,
    ClientError,
    NewSong,
    RetryPolicy,
    SongMetadata,
    SongRecClient,
)

__all__ = ["AsyncSongRecClient", "ClientError", "NewSong", "RetryPolicy", "SongMetadata",
           "SongRecClient"]

"""The song store as a server uses it: the configured store opened (a write-ahead log of
``--data-dir`` imported into it first), and a model caught up with the songs stored since
it last looked. Shared by the server and the ``--processes`` parent."""

from __future__ import annotations

import logging

from server.config import ConfigError, ServerConfig
from server.live import LiveModel
from server.store import SongStore, StoreConfigError, StoreError, import_log, open_store

log = logging.getLogger(__name__)


def catch_up(model: LiveModel, store: SongStore) -> int:
    """Add to ``model`` every song stored after its ``applied_seq`` (blocking; the caller
    holds the write lock). Returns how many it added."""
    added = 0
    while True:
        batch = store.since(model.applied_seq)
        if not batch:
            return added
        added += model.replay([stored.song for stored in batch])[0]
        model.applied_seq = batch[-1].seq


def open_configured_store(config: ServerConfig) -> tuple[SongStore | None, int]:
    """The song store of ``config`` (None: none configured), after importing a write-ahead
    log found in ``--data-dir``; and the torn bytes that import dropped. Raises
    :class:`ConfigError` when the store cannot be opened, :class:`WalError` for a corrupt
    log."""
    url = config.store_url
    if url is None:
        return None, 0
    try:
        store = open_store(url)
    except (StoreConfigError, StoreError) as exc:
        raise ConfigError(str(exc)) from None
    torn = 0
    try:
        if config.data_dir is not None:
            imported = import_log(store, config.data_dir)
            if imported is not None:
                torn = imported[2]
    except StoreError as exc:
        store.close()
        raise ConfigError(f"importing the write-ahead log: {exc}") from None
    except BaseException:
        store.close()
        raise
    log.info("song store %s: %d songs", store.url, store.count())
    return store, torn

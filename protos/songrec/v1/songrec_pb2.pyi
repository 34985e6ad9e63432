from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContinuePlaylistRequest(_message.Message):
    __slots__ = ("seed_song_ids", "tags", "title", "updt_date", "n_songs", "n_tags", "strategy", "drop_future", "include_names")
    SEED_SONG_IDS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    UPDT_DATE_FIELD_NUMBER: _ClassVar[int]
    N_SONGS_FIELD_NUMBER: _ClassVar[int]
    N_TAGS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    DROP_FUTURE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_NAMES_FIELD_NUMBER: _ClassVar[int]
    seed_song_ids: _containers.RepeatedScalarFieldContainer[int]
    tags: _containers.RepeatedScalarFieldContainer[str]
    title: str
    updt_date: str
    n_songs: int
    n_tags: int
    strategy: str
    drop_future: bool
    include_names: bool
    def __init__(self, seed_song_ids: _Optional[_Iterable[int]] = ..., tags: _Optional[_Iterable[str]] = ..., title: _Optional[str] = ..., updt_date: _Optional[str] = ..., n_songs: _Optional[int] = ..., n_tags: _Optional[int] = ..., strategy: _Optional[str] = ..., drop_future: _Optional[bool] = ..., include_names: _Optional[bool] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("kind", "seed_song_id", "playlist_id", "tag")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Reason.Kind]
        SEED_NEIGHBOUR: _ClassVar[Reason.Kind]
        PLAYLIST_NEIGHBOUR: _ClassVar[Reason.Kind]
        TAG: _ClassVar[Reason.Kind]
        TITLE: _ClassVar[Reason.Kind]
        POPULAR: _ClassVar[Reason.Kind]
        ALS: _ClassVar[Reason.Kind]
        ARTIST: _ClassVar[Reason.Kind]
    KIND_UNSPECIFIED: Reason.Kind
    SEED_NEIGHBOUR: Reason.Kind
    PLAYLIST_NEIGHBOUR: Reason.Kind
    TAG: Reason.Kind
    TITLE: Reason.Kind
    POPULAR: Reason.Kind
    ALS: Reason.Kind
    ARTIST: Reason.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEED_SONG_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYLIST_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    kind: Reason.Kind
    seed_song_id: int
    playlist_id: int
    tag: str
    def __init__(self, kind: _Optional[_Union[Reason.Kind, str]] = ..., seed_song_id: _Optional[int] = ..., playlist_id: _Optional[int] = ..., tag: _Optional[str] = ...) -> None: ...

class RecommendedSong(_message.Message):
    __slots__ = ("song_id", "score", "reason", "name", "artists")
    SONG_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARTISTS_FIELD_NUMBER: _ClassVar[int]
    song_id: int
    score: float
    reason: Reason
    name: str
    artists: str
    def __init__(self, song_id: _Optional[int] = ..., score: _Optional[float] = ..., reason: _Optional[_Union[Reason, _Mapping]] = ..., name: _Optional[str] = ..., artists: _Optional[str] = ...) -> None: ...

class RecommendedTag(_message.Message):
    __slots__ = ("tag", "score")
    TAG_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    tag: str
    score: float
    def __init__(self, tag: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ContinuePlaylistResponse(_message.Message):
    __slots__ = ("songs", "tags", "unknown_seed_ids", "unknown_tags", "strategy", "model_version")
    SONGS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_SEED_IDS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_TAGS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    songs: _containers.RepeatedCompositeFieldContainer[RecommendedSong]
    tags: _containers.RepeatedCompositeFieldContainer[RecommendedTag]
    unknown_seed_ids: _containers.RepeatedScalarFieldContainer[int]
    unknown_tags: _containers.RepeatedScalarFieldContainer[str]
    strategy: str
    model_version: str
    def __init__(self, songs: _Optional[_Iterable[_Union[RecommendedSong, _Mapping]]] = ..., tags: _Optional[_Iterable[_Union[RecommendedTag, _Mapping]]] = ..., unknown_seed_ids: _Optional[_Iterable[int]] = ..., unknown_tags: _Optional[_Iterable[str]] = ..., strategy: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class SimilarSongsRequest(_message.Message):
    __slots__ = ("song_id", "k", "exclude_song_ids", "include_names")
    SONG_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SONG_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_NAMES_FIELD_NUMBER: _ClassVar[int]
    song_id: int
    k: int
    exclude_song_ids: _containers.RepeatedScalarFieldContainer[int]
    include_names: bool
    def __init__(self, song_id: _Optional[int] = ..., k: _Optional[int] = ..., exclude_song_ids: _Optional[_Iterable[int]] = ..., include_names: _Optional[bool] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("song_id", "similarity", "name", "artists")
    SONG_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARTISTS_FIELD_NUMBER: _ClassVar[int]
    song_id: int
    similarity: float
    name: str
    artists: str
    def __init__(self, song_id: _Optional[int] = ..., similarity: _Optional[float] = ..., name: _Optional[str] = ..., artists: _Optional[str] = ...) -> None: ...

class SimilarSongsResponse(_message.Message):
    __slots__ = ("song_id", "neighbours", "model_version")
    SONG_ID_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    song_id: int
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    model_version: str
    def __init__(self, song_id: _Optional[int] = ..., neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class SimilarSongsBatchRequest(_message.Message):
    __slots__ = ("song_ids", "k", "exclude_song_ids", "include_names")
    SONG_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SONG_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_NAMES_FIELD_NUMBER: _ClassVar[int]
    song_ids: _containers.RepeatedScalarFieldContainer[int]
    k: int
    exclude_song_ids: _containers.RepeatedScalarFieldContainer[int]
    include_names: bool
    def __init__(self, song_ids: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., exclude_song_ids: _Optional[_Iterable[int]] = ..., include_names: _Optional[bool] = ...) -> None: ...

class SimilarSongsBatchResponse(_message.Message):
    __slots__ = ("results", "unknown_song_ids", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_SONG_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SimilarSongsResponse]
    unknown_song_ids: _containers.RepeatedScalarFieldContainer[int]
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[SimilarSongsResponse, _Mapping]]] = ..., unknown_song_ids: _Optional[_Iterable[int]] = ..., model_version: _Optional[str] = ...) -> None: ...

class SongMetadata(_message.Message):
    __slots__ = ("genres", "detail_genres", "artist_ids", "issue_date", "playlist_ids", "tags")
    GENRES_FIELD_NUMBER: _ClassVar[int]
    DETAIL_GENRES_FIELD_NUMBER: _ClassVar[int]
    ARTIST_IDS_FIELD_NUMBER: _ClassVar[int]
    ISSUE_DATE_FIELD_NUMBER: _ClassVar[int]
    PLAYLIST_IDS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    genres: _containers.RepeatedScalarFieldContainer[str]
    detail_genres: _containers.RepeatedScalarFieldContainer[str]
    artist_ids: _containers.RepeatedScalarFieldContainer[int]
    issue_date: str
    playlist_ids: _containers.RepeatedScalarFieldContainer[int]
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, genres: _Optional[_Iterable[str]] = ..., detail_genres: _Optional[_Iterable[str]] = ..., artist_ids: _Optional[_Iterable[int]] = ..., issue_date: _Optional[str] = ..., playlist_ids: _Optional[_Iterable[int]] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class EncodeSongRequest(_message.Message):
    __slots__ = ("song", "k", "include_names")
    SONG_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_NAMES_FIELD_NUMBER: _ClassVar[int]
    song: SongMetadata
    k: int
    include_names: bool
    def __init__(self, song: _Optional[_Union[SongMetadata, _Mapping]] = ..., k: _Optional[int] = ..., include_names: _Optional[bool] = ...) -> None: ...

class EncodeSongResponse(_message.Message):
    __slots__ = ("code", "neighbours", "known_columns", "model_version")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    code: _containers.RepeatedScalarFieldContainer[float]
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    known_columns: int
    model_version: str
    def __init__(self, code: _Optional[_Iterable[float]] = ..., neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., known_columns: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class NewSong(_message.Message):
    __slots__ = ("song_id", "metadata", "name", "artists")
    SONG_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARTISTS_FIELD_NUMBER: _ClassVar[int]
    song_id: int
    metadata: SongMetadata
    name: str
    artists: str
    def __init__(self, song_id: _Optional[int] = ..., metadata: _Optional[_Union[SongMetadata, _Mapping]] = ..., name: _Optional[str] = ..., artists: _Optional[str] = ...) -> None: ...

class AddSongsRequest(_message.Message):
    __slots__ = ("songs",)
    SONGS_FIELD_NUMBER: _ClassVar[int]
    songs: _containers.RepeatedCompositeFieldContainer[NewSong]
    def __init__(self, songs: _Optional[_Iterable[_Union[NewSong, _Mapping]]] = ...) -> None: ...

class AddSongsResponse(_message.Message):
    __slots__ = ("added_song_ids", "existing_song_ids", "indexed_songs", "model_version")
    ADDED_SONG_IDS_FIELD_NUMBER: _ClassVar[int]
    EXISTING_SONG_IDS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_SONGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    added_song_ids: _containers.RepeatedScalarFieldContainer[int]
    existing_song_ids: _containers.RepeatedScalarFieldContainer[int]
    indexed_songs: int
    model_version: str
    def __init__(self, added_song_ids: _Optional[_Iterable[int]] = ..., existing_song_ids: _Optional[_Iterable[int]] = ..., indexed_songs: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("bundle_path", "skip_verify")
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    SKIP_VERIFY_FIELD_NUMBER: _ClassVar[int]
    bundle_path: str
    skip_verify: bool
    def __init__(self, bundle_path: _Optional[str] = ..., skip_verify: _Optional[bool] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("previous", "current", "replayed_songs", "seconds")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_SONGS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    previous: ModelInfo
    current: ModelInfo
    replayed_songs: int
    seconds: float
    def __init__(self, previous: _Optional[_Union[ModelInfo, _Mapping]] = ..., current: _Optional[_Union[ModelInfo, _Mapping]] = ..., replayed_songs: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IndexParams(_message.Message):
    __slots__ = ("space", "dim", "m", "ef_construction", "ef", "count")
    SPACE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    EF_CONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    EF_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    space: str
    dim: int
    m: int
    ef_construction: int
    ef: int
    count: int
    def __init__(self, space: _Optional[str] = ..., dim: _Optional[int] = ..., m: _Optional[int] = ..., ef_construction: _Optional[int] = ..., ef: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("loaded", "model_version", "created", "data_fingerprint", "code_dim", "input_dim", "column_groups", "bundle_songs", "added_songs", "indexed_songs", "playlists", "tags", "strategies", "default_strategy", "song_index", "playlist_index")
    class ColumnGroupsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CODE_DIM_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    COLUMN_GROUPS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SONGS_FIELD_NUMBER: _ClassVar[int]
    ADDED_SONGS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_SONGS_FIELD_NUMBER: _ClassVar[int]
    PLAYLISTS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SONG_INDEX_FIELD_NUMBER: _ClassVar[int]
    PLAYLIST_INDEX_FIELD_NUMBER: _ClassVar[int]
    loaded: bool
    model_version: str
    created: str
    data_fingerprint: str
    code_dim: int
    input_dim: int
    column_groups: _containers.ScalarMap[str, int]
    bundle_songs: int
    added_songs: int
    indexed_songs: int
    playlists: int
    tags: int
    strategies: _containers.RepeatedScalarFieldContainer[str]
    default_strategy: str
    song_index: IndexParams
    playlist_index: IndexParams
    def __init__(self, loaded: _Optional[bool] = ..., model_version: _Optional[str] = ..., created: _Optional[str] = ..., data_fingerprint: _Optional[str] = ..., code_dim: _Optional[int] = ..., input_dim: _Optional[int] = ..., column_groups: _Optional[_Mapping[str, int]] = ..., bundle_songs: _Optional[int] = ..., added_songs: _Optional[int] = ..., indexed_songs: _Optional[int] = ..., playlists: _Optional[int] = ..., tags: _Optional[int] = ..., strategies: _Optional[_Iterable[str]] = ..., default_strategy: _Optional[str] = ..., song_index: _Optional[_Union[IndexParams, _Mapping]] = ..., playlist_index: _Optional[_Union[IndexParams, _Mapping]] = ...) -> None: ...

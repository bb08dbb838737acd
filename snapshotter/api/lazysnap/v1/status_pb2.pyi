from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayersRequest(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digests: _Optional[_Iterable[str]] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("digest", "image_ref", "mode", "reason", "size", "resolve_seconds", "path", "fetched_bytes", "fetch_state", "prefetched_bytes", "background_bytes", "pull_seconds", "content_bytes", "complete_bytes", "credential_renewed")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    IMAGE_REF_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FETCH_STATE_FIELD_NUMBER: _ClassVar[int]
    PREFETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_BYTES_FIELD_NUMBER: _ClassVar[int]
    PULL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_RENEWED_FIELD_NUMBER: _ClassVar[int]
    digest: str
    image_ref: str
    mode: str
    reason: str
    size: int
    resolve_seconds: float
    path: str
    fetched_bytes: int
    fetch_state: str
    prefetched_bytes: int
    background_bytes: int
    pull_seconds: float
    content_bytes: int
    complete_bytes: int
    credential_renewed: float
    def __init__(self, digest: _Optional[str] = ..., image_ref: _Optional[str] = ..., mode: _Optional[str] = ..., reason: _Optional[str] = ..., size: _Optional[int] = ..., resolve_seconds: _Optional[float] = ..., path: _Optional[str] = ..., fetched_bytes: _Optional[int] = ..., fetch_state: _Optional[str] = ..., prefetched_bytes: _Optional[int] = ..., background_bytes: _Optional[int] = ..., pull_seconds: _Optional[float] = ..., content_bytes: _Optional[int] = ..., complete_bytes: _Optional[int] = ..., credential_renewed: _Optional[float] = ...) -> None: ...

class Cache(_message.Message):
    __slots__ = ("bytes", "max_bytes", "hits", "misses", "evictions")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    def __init__(self, bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class FuseOp(_message.Message):
    __slots__ = ("name", "count", "seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    seconds: float
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class Fuse(_message.Message):
    __slots__ = ("ops", "read_bytes", "read_errors")
    OPS_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[FuseOp]
    read_bytes: int
    read_errors: int
    def __init__(self, ops: _Optional[_Iterable[_Union[FuseOp, _Mapping]]] = ..., read_bytes: _Optional[int] = ..., read_errors: _Optional[int] = ...) -> None: ...

class DataPlane(_message.Message):
    __slots__ = ("generation", "pid", "retiring", "layers", "build")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RETIRING_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    generation: int
    pid: int
    retiring: bool
    layers: int
    build: str
    def __init__(self, generation: _Optional[int] = ..., pid: _Optional[int] = ..., retiring: _Optional[bool] = ..., layers: _Optional[int] = ..., build: _Optional[str] = ...) -> None: ...

class LayersResponse(_message.Message):
    __slots__ = ("layers", "cache", "fuse", "data_planes")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    FUSE_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANES_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    cache: Cache
    fuse: Fuse
    data_planes: _containers.RepeatedCompositeFieldContainer[DataPlane]
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., cache: _Optional[_Union[Cache, _Mapping]] = ..., fuse: _Optional[_Union[Fuse, _Mapping]] = ..., data_planes: _Optional[_Iterable[_Union[DataPlane, _Mapping]]] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("ref", "namespace", "containerd_address", "snapshotter", "plain_http", "certs_dir", "docker_config")
    REF_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONTAINERD_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTTER_FIELD_NUMBER: _ClassVar[int]
    PLAIN_HTTP_FIELD_NUMBER: _ClassVar[int]
    CERTS_DIR_FIELD_NUMBER: _ClassVar[int]
    DOCKER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    ref: str
    namespace: str
    containerd_address: str
    snapshotter: str
    plain_http: bool
    certs_dir: str
    docker_config: str
    def __init__(self, ref: _Optional[str] = ..., namespace: _Optional[str] = ..., containerd_address: _Optional[str] = ..., snapshotter: _Optional[str] = ..., plain_http: _Optional[bool] = ..., certs_dir: _Optional[str] = ..., docker_config: _Optional[str] = ...) -> None: ...

class PulledLayer(_message.Message):
    __slots__ = ("digest", "size", "how", "reason", "seconds", "mode")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HOW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    how: str
    reason: str
    seconds: float
    mode: str
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., how: _Optional[str] = ..., reason: _Optional[str] = ..., seconds: _Optional[float] = ..., mode: _Optional[str] = ...) -> None: ...

class PullReport(_message.Message):
    __slots__ = ("image", "manifest_digest", "layers", "seconds")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    image: str
    manifest_digest: str
    layers: _containers.RepeatedCompositeFieldContainer[PulledLayer]
    seconds: float
    def __init__(self, image: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[PulledLayer, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class PullEvent(_message.Message):
    __slots__ = ("progress", "report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: str
    report: PullReport
    def __init__(self, progress: _Optional[str] = ..., report: _Optional[_Union[PullReport, _Mapping]] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("pull", "wait")
    PULL_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    pull: PullRequest
    wait: bool
    def __init__(self, pull: _Optional[_Union[PullRequest, _Mapping]] = ..., wait: _Optional[bool] = ...) -> None: ...

class WarmedLayer(_message.Message):
    __slots__ = ("digest", "content_bytes", "complete_bytes", "fetched_bytes", "state", "detail")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONTENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    digest: str
    content_bytes: int
    complete_bytes: int
    fetched_bytes: int
    state: str
    detail: str
    def __init__(self, digest: _Optional[str] = ..., content_bytes: _Optional[int] = ..., complete_bytes: _Optional[int] = ..., fetched_bytes: _Optional[int] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class WarmReport(_message.Message):
    __slots__ = ("image", "manifest_digest", "layers", "seconds", "sources", "note", "finished")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    image: str
    manifest_digest: str
    layers: _containers.RepeatedCompositeFieldContainer[WarmedLayer]
    seconds: float
    sources: _containers.RepeatedScalarFieldContainer[str]
    note: str
    finished: bool
    def __init__(self, image: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[WarmedLayer, _Mapping]]] = ..., seconds: _Optional[float] = ..., sources: _Optional[_Iterable[str]] = ..., note: _Optional[str] = ..., finished: _Optional[bool] = ...) -> None: ...

class PrefetchEvent(_message.Message):
    __slots__ = ("progress", "pulled", "report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PULLED_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: str
    pulled: PullReport
    report: WarmReport
    def __init__(self, progress: _Optional[str] = ..., pulled: _Optional[_Union[PullReport, _Mapping]] = ..., report: _Optional[_Union[WarmReport, _Mapping]] = ...) -> None: ...

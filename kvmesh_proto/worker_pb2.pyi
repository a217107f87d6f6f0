from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "cache_salt", "session")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    cache_salt: str
    session: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., cache_salt: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "num_prompt_tokens", "tokens_from_store", "tokens_load_failed", "kv_backend", "kv_bytes", "kv_transfer_s", "kv_wait_s", "tokens_saved", "engine_queue_s", "engine_first_token_s", "lookup_s", "kv_placed_s", "kv_load_path_s", "kv_locate_s", "kv_read_s", "kv_verify_s", "kv_copy_s", "tokens_cached")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FROM_STORE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LOAD_FAILED_FIELD_NUMBER: _ClassVar[int]
    KV_BACKEND_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    KV_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SAVED_FIELD_NUMBER: _ClassVar[int]
    ENGINE_QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_S_FIELD_NUMBER: _ClassVar[int]
    KV_PLACED_S_FIELD_NUMBER: _ClassVar[int]
    KV_LOAD_PATH_S_FIELD_NUMBER: _ClassVar[int]
    KV_LOCATE_S_FIELD_NUMBER: _ClassVar[int]
    KV_READ_S_FIELD_NUMBER: _ClassVar[int]
    KV_VERIFY_S_FIELD_NUMBER: _ClassVar[int]
    KV_COPY_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_CACHED_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    num_prompt_tokens: int
    tokens_from_store: int
    tokens_load_failed: int
    kv_backend: str
    kv_bytes: int
    kv_transfer_s: float
    kv_wait_s: float
    tokens_saved: int
    engine_queue_s: float
    engine_first_token_s: float
    lookup_s: float
    kv_placed_s: float
    kv_load_path_s: float
    kv_locate_s: float
    kv_read_s: float
    kv_verify_s: float
    kv_copy_s: float
    tokens_cached: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., tokens_from_store: _Optional[int] = ..., tokens_load_failed: _Optional[int] = ..., kv_backend: _Optional[str] = ..., kv_bytes: _Optional[int] = ..., kv_transfer_s: _Optional[float] = ..., kv_wait_s: _Optional[float] = ..., tokens_saved: _Optional[int] = ..., engine_queue_s: _Optional[float] = ..., engine_first_token_s: _Optional[float] = ..., lookup_s: _Optional[float] = ..., kv_placed_s: _Optional[float] = ..., kv_load_path_s: _Optional[float] = ..., kv_locate_s: _Optional[float] = ..., kv_read_s: _Optional[float] = ..., kv_verify_s: _Optional[float] = ..., kv_copy_s: _Optional[float] = ..., tokens_cached: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status", "role", "model", "running", "max_model_len", "engine_config", "block_size", "engine_stats", "kv_blocks_free", "kv_blocks_total")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    ENGINE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_STATS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    status: str
    role: str
    model: str
    running: int
    max_model_len: int
    engine_config: str
    block_size: int
    engine_stats: str
    kv_blocks_free: int
    kv_blocks_total: int
    def __init__(self, status: _Optional[str] = ..., role: _Optional[str] = ..., model: _Optional[str] = ..., running: _Optional[int] = ..., max_model_len: _Optional[int] = ..., engine_config: _Optional[str] = ..., block_size: _Optional[int] = ..., engine_stats: _Optional[str] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ...) -> None: ...

"""The Weaviate vector store: the :class:`~tools.vectors.base.VectorStore` contract on a server.

One Weaviate collection per fabric collection (bring-your-own vectors, HNSW with cosine
distance, native multi-tenancy) and one Weaviate tenant per fabric tenant, created on its first
upsert. Objects carry ``doc_id`` (the document id; the object's uuid is a UUID5 of it), ``text``
and one property per metadata key: strings as ``TEXT`` with ``field`` tokenization (so ``eq``
compares whole values), numbers as ``NUMBER`` (ints come back as floats), booleans as
``BOOL``. Only ``text`` is keyword-searchable. The collection's description records its vector
dimension, so every client checks dimensions before sending.

Search: ``alpha == 1`` is ``near_vector`` (score ``1 - cosine distance``), ``alpha == 0`` is
``bm25`` on ``text``, anything between is ``hybrid`` with relative-score fusion. Conditions are
translated to ``Filter.by_property``; a condition that can never (or always) hold for the
collection's schema, such as one on a property no document has, is decided here, which keeps the
contract's missing-field and cross-kind semantics. The client is the v4 async client, created
and connected on first use (never on import or construction); its connection failures become
``TransientError``.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import weaviate
from weaviate.classes.config import Configure, DataType, Property, Tokenization, VectorDistances
from weaviate.classes.data import DataObject
from weaviate.classes.init import AdditionalConfig, Auth, Timeout
from weaviate.classes.query import Filter, FilterReturn, HybridFusion, MetadataQuery
from weaviate.classes.tenants import Tenant
from weaviate.client import WeaviateAsyncClient
from weaviate.collections import CollectionAsync
from weaviate.exceptions import (
    AuthenticationFailedError,
    UnexpectedStatusCodeError,
    WeaviateBaseError,
    WeaviateClosedClientError,
    WeaviateConnectionError,
    WeaviateGRPCUnavailableError,
    WeaviateRetryError,
    WeaviateStartUpError,
    WeaviateTimeoutError,
)

from agentfabric.errors import ConfigError, PermanentError, TransientError

from .base import (
    Condition,
    Document,
    Hit,
    MetadataValue,
    canonical_collection,
    check_dim,
    check_search_args,
    check_tenant,
    check_vector,
)

__all__ = ["UUID_NAMESPACE", "WeaviateVectorStore", "object_uuid"]

UUID_NAMESPACE = uuid.UUID("6f6b1d6e-4a8c-5a39-9a55-0c2f0e3b7a11")
_DIM = re.compile(r"agentfabric-dim=(\d+)")
_FIXED = ("doc_id", "text")
_UNAVAILABLE = (WeaviateConnectionError, WeaviateTimeoutError, WeaviateGRPCUnavailableError,
                WeaviateStartUpError, WeaviateClosedClientError, WeaviateRetryError)


def object_uuid(doc_id: str) -> uuid.UUID:
    """The Weaviate object uuid of a document id (UUID5, the same in every process)."""
    return uuid.uuid5(UUID_NAMESPACE, doc_id)


def _data_type(value: MetadataValue) -> DataType:
    if isinstance(value, bool):
        return DataType.BOOL
    if isinstance(value, int | float):
        return DataType.NUMBER
    return DataType.TEXT


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Weaviate client errors as agentfabric errors."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise TransientError(f"Weaviate is unavailable during {action}: {exc}") from exc
    except AuthenticationFailedError as exc:
        raise ConfigError(f"Weaviate rejected the credentials during {action}: {exc}") from exc
    except UnexpectedStatusCodeError as exc:
        if exc.status_code in (401, 403):
            raise ConfigError(f"Weaviate refused {action} ({exc.status_code}); check the API "
                              "key and its permissions") from exc
        if exc.status_code == 429 or exc.status_code >= 500:
            raise TransientError(f"Weaviate failed {action} ({exc.status_code}): {exc}") from exc
        raise PermanentError(f"Weaviate rejected {action} ({exc.status_code}): {exc}") from exc
    except WeaviateBaseError as exc:
        text = str(exc)
        if "UNAVAILABLE" in text or "DEADLINE_EXCEEDED" in text:
            raise TransientError(f"Weaviate is unavailable during {action}: {text}") from exc
        raise PermanentError(f"Weaviate rejected {action}: {text}") from exc
    except OSError as exc:
        raise TransientError(f"Weaviate is unreachable during {action}: {exc}") from exc


class WeaviateVectorStore:
    """A :class:`~tools.vectors.base.VectorStore` on a Weaviate server at ``url``."""

    def __init__(self, url: str, api_key: str | None = None, *, grpc_port: int = 50051,
                 grpc_secure: bool | None = None, timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"Weaviate URL {url!r} is invalid: use http(s)://host[:port]")
        secure = parts.scheme == "https"
        try:
            port = parts.port or (443 if secure else 80)
        except ValueError as exc:
            raise ConfigError(f"Weaviate URL {url!r} has an invalid port") from exc
        self._host, self._port, self._secure = parts.hostname, port, secure
        self._grpc_port = grpc_port
        self._grpc_secure = secure if grpc_secure is None else grpc_secure
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._client: WeaviateAsyncClient | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self._dims: dict[str, int] = {}
        self._props: dict[str, dict[str, DataType]] = {}
        self._tenants: set[tuple[str, str]] = set()

    # -- plumbing ----------------------------------------------------------------------------

    async def _connected(self) -> WeaviateAsyncClient:
        if self._closed:
            raise ConfigError("the Weaviate vector store is closed")
        async with self._connect_lock:
            if self._client is None:
                timeout = Timeout(init=self._timeout_s, query=self._timeout_s,
                                  insert=self._timeout_s * 3)
                client = weaviate.use_async_with_custom(
                    http_host=self._host, http_port=self._port, http_secure=self._secure,
                    grpc_host=self._host, grpc_port=self._grpc_port,
                    grpc_secure=self._grpc_secure,
                    auth_credentials=Auth.api_key(self._api_key) if self._api_key else None,
                    additional_config=AdditionalConfig(timeout=timeout))
                try:
                    with _translated("connect"):
                        await client.connect()
                except BaseException:
                    await client.close()
                    raise
                self._client = client
            return self._client

    async def _collection(self, name: str) -> tuple[CollectionAsync[Any, Any], int]:
        """The collection and its dimension; ``ConfigError`` if it does not exist."""
        client = await self._connected()
        if name not in self._dims:
            with _translated(f"reading collection '{name}'"):
                if not await client.collections.exists(name):
                    raise ConfigError(f"collection '{name}' does not exist; call "
                                      "ensure_collection first")
            await self._load_schema(client.collections.use(name), name)
        return client.collections.use(name), self._dims[name]

    async def _load_schema(self, collection: CollectionAsync[Any, Any], name: str) -> None:
        with _translated(f"reading collection '{name}'"):
            config = await collection.config.get()
        found = _DIM.search(config.description or "")
        if found is None:
            raise ConfigError(f"Weaviate collection '{name}' was not created by agentfabric "
                              "(no dimension in its description); use another name")
        self._dims[name] = int(found.group(1))
        self._props[name] = {p.name: p.data_type for p in config.properties}

    async def _tenant_exists(self, collection: CollectionAsync[Any, Any], name: str,
                             tenant: str) -> bool:
        if (name, tenant) not in self._tenants:
            with _translated(f"reading tenant '{tenant}'"):
                if not await collection.tenants.exists(tenant):
                    return False
            self._tenants.add((name, tenant))
        return True

    async def _ensure_properties(self, collection: CollectionAsync[Any, Any], name: str,
                                 documents: Sequence[Document]) -> None:
        wanted: dict[str, DataType] = {}
        for doc in documents:
            for key, value in doc.metadata.items():
                wanted.setdefault(key, _data_type(value))
        for attempt in range(2):
            known = self._props[name]
            missing = {k: t for k, t in wanted.items() if k not in known}
            try:
                for key, data_type in missing.items():
                    with _translated(f"adding property '{key}' to '{name}'"):
                        await collection.config.add_property(Property(
                            name=key, data_type=data_type, index_searchable=False,
                            tokenization=Tokenization.FIELD
                            if data_type == DataType.TEXT else None))
                    known[key] = data_type
                break
            except PermanentError:  # another client added it first: reread and check again
                if attempt:
                    raise
                await self._load_schema(collection, name)
        for doc in documents:
            for key, value in doc.metadata.items():
                if _data_type(value) != self._props[name][key]:
                    raise PermanentError(
                        f"metadata '{key}' of document '{doc.id}' is {type(value).__name__} "
                        f"but collection '{name}' stores {self._props[name][key].value} there")

    def _where(self, name: str, conditions: Sequence[Condition]) -> FilterReturn | bool | None:
        """The Weaviate filter, or False if it can never match (None: no filter)."""
        props = self._props.get(name, {})
        clauses: list[FilterReturn] = []
        for cond in conditions:
            clause = _clause(cond, props.get(cond.field))
            if clause is False:
                return False
            if clause is not True:
                clauses.append(clause)
        return Filter.all_of(clauses) if clauses else None

    # -- the contract ------------------------------------------------------------------------

    async def ensure_collection(self, name: str, dim: int) -> None:
        name, dim = canonical_collection(name), check_dim(dim)
        client = await self._connected()
        with _translated(f"reading collection '{name}'"):
            exists = await client.collections.exists(name)
        if not exists:
            try:
                with _translated(f"creating collection '{name}'"):
                    await client.collections.create(
                        name, description=f"agentfabric vector collection; agentfabric-dim={dim}",
                        vector_config=Configure.Vectors.self_provided(
                            vector_index_config=Configure.VectorIndex.hnsw(
                                distance_metric=VectorDistances.COSINE)),
                        multi_tenancy_config=Configure.multi_tenancy(
                            enabled=True, auto_tenant_creation=True, auto_tenant_activation=True),
                        inverted_index_config=Configure.inverted_index(index_null_state=True),
                        properties=[
                            Property(name="doc_id", data_type=DataType.TEXT,
                                     tokenization=Tokenization.FIELD, index_searchable=False),
                            Property(name="text", data_type=DataType.TEXT,
                                     tokenization=Tokenization.WORD),
                        ])
            except PermanentError:  # created concurrently by another client
                with _translated(f"reading collection '{name}'"):
                    if not await client.collections.exists(name):
                        raise
        await self._load_schema(client.collections.use(name), name)
        if self._dims[name] != dim:
            raise ConfigError(f"collection '{name}' exists with {self._dims[name]}-dimensional "
                              f"vectors, not {dim}; use another collection name")

    async def upsert(self, collection: str, tenant: str, documents: Sequence[Document],
                     vectors: Sequence[Sequence[float]]) -> int:
        name, tenant = canonical_collection(collection), check_tenant(tenant)
        if len(documents) != len(vectors):
            raise PermanentError(f"upsert got {len(documents)} documents but {len(vectors)} "
                                 "vectors; pass one vector per document")
        if len({d.id for d in documents}) != len(documents):
            raise PermanentError("upsert got the same document id twice in one call")
        if not documents:
            return 0
        coll, dim = await self._collection(name)
        checked = [check_vector(v, dim, name) for v in vectors]
        await self._ensure_properties(coll, name, documents)
        if not await self._tenant_exists(coll, name, tenant):
            try:
                with _translated(f"creating tenant '{tenant}'"):
                    await coll.tenants.create(Tenant(name=tenant))
            except PermanentError:  # created concurrently
                if not await self._tenant_exists(coll, name, tenant):
                    raise
        objects = [
            DataObject(properties={"doc_id": d.id, "text": d.text, **{
                k: float(v) if self._props[name][k] == DataType.NUMBER else v
                for k, v in d.metadata.items()}}, uuid=object_uuid(d.id), vector=v)
            for d, v in zip(documents, checked, strict=True)]
        with _translated(f"upserting into '{name}'/'{tenant}'"):
            result = await coll.with_tenant(tenant).data.insert_many(objects)
        if result.has_errors:
            index, error = next(iter(result.errors.items()))
            raise PermanentError(f"Weaviate rejected {len(result.errors)} of {len(objects)} "
                                 f"documents, e.g. '{documents[index].id}': {error.message}")
        return len(documents)

    async def search(self, collection: str, tenant: str, vector: Sequence[float], *, k: int = 5,
                     query_text: str | None = None, alpha: float = 1.0,
                     filters: Sequence[Condition] = ()) -> list[Hit]:
        name, tenant = canonical_collection(collection), check_tenant(tenant)
        check_search_args(k, alpha, query_text)
        coll, dim = await self._collection(name)
        query_vector = check_vector(vector, dim, name)
        if not await self._tenant_exists(coll, name, tenant):
            return []
        if any(c.field not in self._props[name] for c in filters):
            await self._load_schema(coll, name)  # another client may have added the property
        where = self._where(name, filters)
        if where is False:
            return []
        flt = None if where is None or where is True else where
        scoped = coll.with_tenant(tenant)
        with _translated(f"searching '{name}'/'{tenant}'"):
            if alpha >= 1.0:
                response = await scoped.query.near_vector(
                    near_vector=query_vector, limit=k, filters=flt,
                    return_metadata=MetadataQuery(distance=True))
            elif alpha <= 0.0:
                response = await scoped.query.bm25(
                    query=query_text, query_properties=["text"], limit=k, filters=flt,
                    return_metadata=MetadataQuery(score=True))
            else:
                response = await scoped.query.hybrid(
                    query=query_text, vector=query_vector, alpha=alpha,
                    fusion_type=HybridFusion.RELATIVE_SCORE, query_properties=["text"],
                    limit=k, filters=flt, return_metadata=MetadataQuery(score=True))
        hits: list[Hit] = []
        for obj in response.objects:
            props: dict[str, Any] = dict(obj.properties)
            if alpha >= 1.0:
                score = 1.0 - float(obj.metadata.distance or 0.0)
            else:
                score = float(obj.metadata.score or 0.0)
            hits.append(Hit(id=str(props["doc_id"]), text=str(props.get("text") or ""),
                            metadata={key: value for key, value in props.items()
                                      if key not in _FIXED
                                      and isinstance(value, str | int | float | bool)},
                            score=score))
        return hits

    async def delete(self, collection: str, tenant: str, ids: Sequence[str]) -> int:
        name, tenant = canonical_collection(collection), check_tenant(tenant)
        coll, _ = await self._collection(name)
        wanted = list(dict.fromkeys(ids))
        if not wanted or not await self._tenant_exists(coll, name, tenant):
            return 0
        with _translated(f"deleting from '{name}'/'{tenant}'"):
            result = await coll.with_tenant(tenant).data.delete_many(
                where=Filter.by_id().contains_any([object_uuid(i) for i in wanted]))
        return int(result.successful)

    async def count(self, collection: str, tenant: str) -> int:
        name, tenant = canonical_collection(collection), check_tenant(tenant)
        coll, _ = await self._collection(name)
        if not await self._tenant_exists(coll, name, tenant):
            return 0
        with _translated(f"counting '{name}'/'{tenant}'"):
            result = await coll.with_tenant(tenant).aggregate.over_all(total_count=True)
        return int(result.total_count or 0)

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            with _translated("close"):
                await client.close()


def _clause(cond: Condition, data_type: DataType | None) -> FilterReturn | bool:
    """One condition as a Weaviate filter, or True/False when the schema decides it."""
    prop = Filter.by_property(cond.field)
    if cond.op == "ne":
        assert not isinstance(cond.value, list)
        value = _typed(cond.value, data_type)
        if value is None:
            return True
        return Filter.any_of([prop.not_equal(value), prop.is_none(True)])
    values = cond.value if isinstance(cond.value, list) else [cond.value]
    typed = [t for t in (_typed(v, data_type) for v in values) if t is not None]
    if not typed:
        return False
    if cond.op in ("eq", "in"):
        return Filter.any_of([prop.equal(v) for v in typed])
    (value,) = typed
    if cond.op == "gt":
        return prop.greater_than(value)
    if cond.op == "gte":
        return prop.greater_or_equal(value)
    if cond.op == "lt":
        return prop.less_than(value)
    return prop.less_or_equal(value)


def _typed(value: MetadataValue, data_type: DataType | None) -> MetadataValue | None:
    """``value`` as the property stores it, or None if no stored value can equal it."""
    if data_type is None or _data_type(value) != data_type:
        return None
    return float(value) if data_type == DataType.NUMBER else value

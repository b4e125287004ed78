"""The VectorStore contract, run against every backend: always the embedded store, and Weaviate
when WEAVIATE_URL (and optionally WEAVIATE_API_KEY) names a server."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from agentfabric.errors import ConfigError, PermanentError
from tools.vectors import Condition, Document, EmbeddedVectorStore, Hit, VectorStore
from tools.vectors.base import relative_score_fusion

pytestmark = pytest.mark.timeout(60)

StoreFactory = Callable[[], VectorStore]
TENANT = "acme"

BACKENDS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("weaviate", id="weaviate", marks=pytest.mark.skipif(
        not os.environ.get("WEAVIATE_URL"),
        reason="WEAVIATE_URL is not set: no Weaviate server to run the contract against")),
]


@pytest.fixture(params=BACKENDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Opens a store on the same data each time it is called (to test reopening)."""
    if request.param == "embedded":
        return lambda: EmbeddedVectorStore(tmp_path / "vectors")
    from tools.vectors.weaviate_store import WeaviateVectorStore

    url, key = os.environ["WEAVIATE_URL"], os.environ.get("WEAVIATE_API_KEY")
    return lambda: WeaviateVectorStore(url, key)


@pytest.fixture
async def store(open_store: StoreFactory) -> AsyncIterator[VectorStore]:
    opened = open_store()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def coll(store: VectorStore) -> str:
    """A fresh 4-dimensional collection (unique, so a shared Weaviate server works too)."""
    name = f"Contract_{uuid.uuid4().hex[:12]}"
    await store.ensure_collection(name, 4)
    return name


def doc(doc_id: str, text: str = "", **metadata: str | int | float | bool) -> Document:
    return Document(id=doc_id, text=text or f"document {doc_id}", metadata=metadata)


def ids(hits: Sequence[Hit]) -> list[str]:
    return [h.id for h in hits]


async def test_upsert_count_and_replace_by_id(store: VectorStore, coll: str) -> None:
    docs = [doc("a", "first", n=1), doc("b", "second"), doc("c", "third")]
    assert await store.upsert(coll, TENANT, docs, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]) == 3
    assert await store.count(coll, TENANT) == 3

    replaced = Document(id="a", text="first, rewritten", metadata={"n": 2, "tag": "new"})
    assert await store.upsert(coll, TENANT, [replaced], [[0, 0, 0, 1]]) == 1
    assert await store.count(coll, TENANT) == 3
    hits = await store.search(coll, TENANT, [0, 0, 0, 1], k=1)
    assert ids(hits) == ["a"]
    assert hits[0].text == "first, rewritten"
    assert hits[0].metadata == {"n": 2, "tag": "new"}
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    old_place = await store.search(coll, TENANT, [1, 1, 1, 0], k=3)
    assert ids(old_place) == ["b", "c", "a"]
    assert old_place[2].score == pytest.approx(0.0, abs=1e-5)


async def test_delete_returns_how_many_existed(store: VectorStore, coll: str) -> None:
    await store.upsert(coll, TENANT, [doc("a"), doc("b")], [[1, 0, 0, 0], [0, 1, 0, 0]])
    assert await store.delete(coll, TENANT, ["a", "missing"]) == 1
    assert await store.count(coll, TENANT) == 1
    assert await store.delete(coll, TENANT, ["a"]) == 0
    assert ids(await store.search(coll, TENANT, [1, 0, 0, 0], k=5)) == ["b"]


async def test_k_limits_results_and_scores_are_cosine_best_first(store: VectorStore,
                                                                 coll: str) -> None:
    vectors = {"exact": [2, 0, 0, 0], "close": [1, 1, 0, 0], "far": [0, 1, 0, 0],
               "opposite": [-1, 0, 0, 0], "mixed": [1, 0, 1, 1]}
    await store.upsert(coll, TENANT, [doc(i) for i in vectors], list(vectors.values()))
    hits = await store.search(coll, TENANT, [1, 0, 0, 0], k=3)
    assert ids(hits) == ["exact", "close", "mixed"]
    assert [h.score for h in hits] == pytest.approx([1.0, 0.5 ** 0.5, 3 ** -0.5], abs=1e-5)
    everything = await store.search(coll, TENANT, [1, 0, 0, 0], k=50)
    assert ids(everything) == ["exact", "close", "mixed", "far", "opposite"]
    assert everything[-1].score == pytest.approx(-1.0, abs=1e-5)


async def test_keyword_search_finds_the_exact_term(store: VectorStore, coll: str) -> None:
    docs = [doc("filters", "Zeolite water filters for municipal treatment plants"),
            doc("pumps", "Industrial pumps for water treatment"),
            doc("bakery", "Sourdough bread and pastries")]
    await store.upsert(coll, TENANT, docs, [[0, 1, 0, 0], [1, 0, 0, 0], [1, 0.1, 0, 0]])
    # The vector points at "pumps": alpha=0 must ignore it.
    hits = await store.search(coll, TENANT, [1, 0, 0, 0], query_text="zeolite", alpha=0.0)
    assert ids(hits) == ["filters"]
    assert hits[0].score > 0
    both = await store.search(coll, TENANT, [1, 0, 0, 0], query_text="the water", alpha=0.0)
    assert set(ids(both)) == {"filters", "pumps"}
    assert both[0].score >= both[1].score
    assert await store.search(coll, TENANT, [1, 0, 0, 0], query_text="quasar", alpha=0.0) == []


async def test_hybrid_is_relative_score_fusion_of_both_lists(store: VectorStore,
                                                             coll: str) -> None:
    docs = [doc("a", "solar panels and solar trackers for farms"),
            doc("b", "solar inverters for homes, offices, shops and warehouses everywhere"),
            doc("c", "wind turbines"), doc("d", "solar solar solar"), doc("e", "hydro dams")]
    vectors: list[list[float]] = [[0.9, 0.44, 0, 0], [0.5, 0.866, 0, 0], [1, 0, 0, 0],
                                  [0, 0, 1, 0], [0, 0, 0, 1]]
    await store.upsert(coll, TENANT, docs, vectors)
    query, text = [1, 0, 0, 0], "solar"
    vector_hits = await store.search(coll, TENANT, query, k=10)
    keyword_hits = await store.search(coll, TENANT, query, k=10, query_text=text, alpha=0.0)
    hybrid = await store.search(coll, TENANT, query, k=10, query_text=text, alpha=0.5)
    expected = relative_score_fusion({h.id: h.score for h in vector_hits},
                                     {h.id: h.score for h in keyword_hits}, 0.5)
    assert {h.id: h.score for h in hybrid} == pytest.approx(expected, abs=1e-4)
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
    # "c" wins on vectors and "d" on keywords, but "a" is good at both.
    assert (vector_hits[0].id, keyword_hits[0].id, hybrid[0].id) == ("c", "d", "a")
    top_two = await store.search(coll, TENANT, query, k=2, query_text=text, alpha=0.5)
    assert ids(top_two) == ids(hybrid)[:2]


FILTER_DOCS = {
    "d1": {"industry": "retail", "employees": 50, "listed": True, "rating": 4.5},
    "d2": {"industry": "energy", "employees": 500, "listed": False},
    "d3": {"industry": "retail", "employees": 5000},
    "d4": {},
}
ALL = {"d1", "d2", "d3", "d4"}
FILTER_CASES = [
    ([Condition(field="industry", op="eq", value="retail")], {"d1", "d3"}),
    ([Condition(field="industry", op="ne", value="retail")], {"d2", "d4"}),
    ([Condition(field="employees", op="gt", value=500)], {"d3"}),
    ([Condition(field="employees", op="gte", value=500)], {"d2", "d3"}),
    ([Condition(field="employees", op="lt", value=500)], {"d1"}),
    ([Condition(field="employees", op="lte", value=500)], {"d1", "d2"}),
    ([Condition(field="employees", op="eq", value=50.0)], {"d1"}),
    ([Condition(field="rating", op="gt", value=4)], {"d1"}),
    ([Condition(field="industry", op="in", value=["energy", "mining"])], {"d2"}),
    ([Condition(field="employees", op="in", value=[50, 5000])], {"d1", "d3"}),
    ([Condition(field="listed", op="eq", value=True)], {"d1"}),
    ([Condition(field="listed", op="ne", value=True)], {"d2", "d3", "d4"}),
    ([Condition(field="industry", op="eq", value="retail"),
      Condition(field="employees", op="gt", value=100)], {"d3"}),
    # a missing field never matches, except for "ne"
    ([Condition(field="rating", op="lte", value=10)], {"d1"}),
    ([Condition(field="nosuch", op="eq", value="x")], set()),
    ([Condition(field="nosuch", op="gt", value=1)], set()),
    ([Condition(field="nosuch", op="in", value=["x"])], set()),
    ([Condition(field="nosuch", op="ne", value="x")], ALL),
    # values of another kind never compare equal
    ([Condition(field="employees", op="eq", value="50")], set()),
    ([Condition(field="employees", op="ne", value="50")], ALL),
]


@pytest.mark.parametrize(("conditions", "expected"), FILTER_CASES)
async def test_filters(store: VectorStore, coll: str, conditions: list[Condition],
                       expected: set[str]) -> None:
    docs = [Document(id=i, text=f"company {i}", metadata=md) for i, md in FILTER_DOCS.items()]
    await store.upsert(coll, TENANT, docs, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0],
                                            [1, 0, 0, 1]])
    hits = await store.search(coll, TENANT, [1, 0, 0, 0], k=10, filters=conditions)
    assert set(ids(hits)) == expected
    keyword = await store.search(coll, TENANT, [1, 0, 0, 0], k=10, query_text="company",
                                 alpha=0.0, filters=conditions)
    assert set(ids(keyword)) == expected


def test_conditions_validate_their_values() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        Condition(field="x", op="in", value=[])
    with pytest.raises(ValueError, match="one value"):
        Condition(field="x", op="eq", value=["a"])
    with pytest.raises(ValueError, match="not booleans"):
        Condition(field="x", op="gt", value=True)
    with pytest.raises(ValueError, match="metadata key"):
        Document(id="a", text="t", metadata={"doc_id": "x"})


async def test_wrong_dimension_is_rejected(store: VectorStore, coll: str) -> None:
    with pytest.raises(PermanentError, match=r"3 dimensions.*4-dimensional"):
        await store.upsert(coll, TENANT, [doc("a")], [[1, 0, 0]])
    await store.upsert(coll, TENANT, [doc("a")], [[1, 0, 0, 0]])
    with pytest.raises(PermanentError, match=r"5 dimensions.*4-dimensional"):
        await store.search(coll, TENANT, [1, 0, 0, 0, 0])
    with pytest.raises(ConfigError, match="4-dimensional"):
        await store.ensure_collection(coll, 8)
    await store.ensure_collection(coll, 4)  # same dimension: fine


async def test_bad_requests_are_permanent(store: VectorStore, coll: str) -> None:
    with pytest.raises(PermanentError, match="2 documents but 1 vectors"):
        await store.upsert(coll, TENANT, [doc("a"), doc("b")], [[1, 0, 0, 0]])
    with pytest.raises(PermanentError, match="twice"):
        await store.upsert(coll, TENANT, [doc("a"), doc("a")], [[1, 0, 0, 0], [0, 1, 0, 0]])
    with pytest.raises(PermanentError, match="all zeros"):
        await store.upsert(coll, TENANT, [doc("a")], [[0, 0, 0, 0]])
    with pytest.raises(PermanentError, match="k must be"):
        await store.search(coll, TENANT, [1, 0, 0, 0], k=0)
    with pytest.raises(PermanentError, match="alpha must be"):
        await store.search(coll, TENANT, [1, 0, 0, 0], alpha=1.5, query_text="x")
    with pytest.raises(PermanentError, match="needs query_text"):
        await store.search(coll, TENANT, [1, 0, 0, 0], alpha=0.5)


async def test_tenants_are_isolated(store: VectorStore, coll: str) -> None:
    vectors = [[1, 0, 0, 0], [0, 1, 0, 0]]
    await store.upsert(coll, "acme", [doc("x", "acme anvils"), doc("y", "acme rockets")], vectors)
    await store.upsert(coll, "globex", [doc("x", "globex magnets"), doc("y", "globex lasers")],
                       vectors)
    for tenant in ("acme", "globex"):
        hits = await store.search(coll, tenant, [1, 0, 0, 0], k=10)
        assert ids(hits) == ["x", "y"]
        assert all(h.text.startswith(tenant) for h in hits)
        keyword = await store.search(coll, tenant, [1, 0, 0, 0], query_text="acme globex lasers",
                                     alpha=0.0, k=10)
        assert keyword
        assert all(h.text.startswith(tenant) for h in keyword)
    assert await store.search(coll, "acme", [1, 0, 0, 0], query_text="magnets", alpha=0.0) == []
    assert await store.delete(coll, "acme", ["x"]) == 1
    assert await store.count(coll, "acme") == 1
    assert await store.count(coll, "globex") == 2


async def test_invalid_names(store: VectorStore, coll: str) -> None:
    for bad in ("1docs", "bad-name", "", "x" * 65, "spaced name"):
        with pytest.raises(ConfigError, match="collection name"):
            await store.ensure_collection(bad, 4)
    for tenant in ("Acme", "", "a b", "-lead", "t" * 65):
        with pytest.raises(PermanentError, match="tenant name"):
            await store.upsert(coll, tenant, [doc("a")], [[1, 0, 0, 0]])
        with pytest.raises(PermanentError, match="tenant name"):
            await store.search(coll, tenant, [1, 0, 0, 0])
    with pytest.raises(ConfigError, match="does not exist"):
        await store.count(f"Missing_{uuid.uuid4().hex[:8]}", TENANT)


async def test_empty_tenant(store: VectorStore, coll: str) -> None:
    assert await store.search(coll, "nobody", [1, 0, 0, 0]) == []
    assert await store.search(coll, "nobody", [1, 0, 0, 0], query_text="x", alpha=0.5) == []
    assert await store.count(coll, "nobody") == 0
    assert await store.delete(coll, "nobody", ["a"]) == 0


async def test_data_survives_close_and_reopen(open_store: StoreFactory) -> None:
    name = f"Durable_{uuid.uuid4().hex[:12]}"
    first = open_store()
    await first.ensure_collection(name, 4)
    await first.upsert(name, TENANT, [doc("a", "kept", n=1), doc("b")],
                       [[1, 0, 0, 0], [0, 1, 0, 0]])
    await first.close()
    with pytest.raises(ConfigError, match="closed"):
        await first.count(name, TENANT)
    second = open_store()
    try:
        assert await second.count(name, TENANT) == 2
        hits = await second.search(name, TENANT, [1, 0, 0, 0], k=1)
        assert [(h.id, h.text, h.metadata) for h in hits] == [("a", "kept", {"n": 1})]
        await second.ensure_collection(name, 4)
    finally:
        await second.close()

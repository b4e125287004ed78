"""``lookup``: semantic search of a knowledge base for this run's tenant.

The query and filter values are templates. Hits come back as the step's output
(``hits``: id, text, metadata, score, best first), ready for an ``llm`` prompt or a
``transform``. ``alpha`` below 1 mixes keyword (BM25) scoring in: hybrid search.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from agentfabric.errors import PermanentError
from agents.expr import Expression
from agents.template import Template
from tools.vectors import Condition

from .base import StepContext, StepOutcome, StepSpec, register_step_kind

__all__ = ["LookupFilter", "LookupStep"]


class LookupFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    field: str
    op: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in"] = "eq"
    value: Any


@register_step_kind("lookup")
class LookupStep(StepSpec):
    collection: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
    query: str = Field(min_length=1, description="Template: the text to search for.")
    k: int = Field(default=5, ge=1, le=100)
    alpha: float = Field(default=1.0, ge=0.0, le=1.0,
                         description="1: vector search; 0: keyword; between: hybrid.")
    filters: list[LookupFilter] = Field(default_factory=list)
    _query: Template = PrivateAttr()
    _values: list[Template] = PrivateAttr(default_factory=list)

    def compile(self, base_dir: Path) -> None:
        self._query = self._template("query", self.query)
        self._values = [self._template(f"filters[{i}].value", f.value)
                        for i, f in enumerate(self.filters)]

    def expressions(self) -> Iterator[tuple[str, Expression]]:
        yield from self._template_expressions("query", self._query)
        for i, value in enumerate(self._values):
            yield from self._template_expressions(f"filters[{i}].value", value)

    def uses_knowledge(self) -> bool:
        return True

    async def run(self, ctx: StepContext) -> StepOutcome:
        if ctx.knowledge is None:
            raise PermanentError(f"step '{self.id}' needs a knowledge base; configure one")
        query = self._query.render(ctx.scope)
        if not isinstance(query, str) or not query.strip():
            raise PermanentError(f"step '{self.id}': the query rendered to {query!r}, not "
                                 f"text; check the query template and the run's data")
        conditions = [Condition(field=f.field, op=f.op, value=v.render(ctx.scope))
                      for f, v in zip(self.filters, self._values, strict=True)]
        hits = await ctx.knowledge.search(self.collection, ctx.message.tenant, query,
                                          k=self.k, alpha=self.alpha, filters=conditions)
        return StepOutcome({"query": query, "hits": [h.model_dump() for h in hits]})

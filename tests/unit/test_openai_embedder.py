"""The OpenAI embedder through the real openai client against the local model server."""

from __future__ import annotations

import math

import openai
import pytest

from agentfabric.errors import TransientError
from agents.model_script import ModelScript
from agents.model_server import serve
from streams.embedded import free_port
from tools.vectors import OpenAIEmbedder

pytestmark = pytest.mark.timeout(60)


async def test_embeddings_come_back_normalised_and_deterministic() -> None:
    handle = await serve(ModelScript.parse({"rules": [], "embedding_dim": 64}), port=0)
    client = openai.AsyncOpenAI(base_url=handle.url, api_key="test", max_retries=0)
    try:
        embedder = OpenAIEmbedder(client, "fabric-local-1", 64, batch_size=2)
        first = await embedder.embed(["cold chain trucks", "cold chain trucks", "law firm",
                                      "pickles"])
        assert len(first) == 4
        assert all(len(v) == 64 for v in first)
        assert first[0] == first[1]
        assert math.isclose(sum(x * x for x in first[0]), 1.0, rel_tol=1e-5)
        assert first[0] != first[2]
    finally:
        await client.close()
        await handle.close()


async def test_an_unreachable_server_is_transient() -> None:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="x",
                                max_retries=0, timeout=2)
    try:
        with pytest.raises(TransientError):
            await OpenAIEmbedder(client, "m", 8).embed(["x"])
    finally:
        await client.close()

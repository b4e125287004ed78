"""The HTTP front door (``agentfabric ingress``): signed CRM/ERP webhooks and the run API.

- ``context``   what every route needs (settings, producer, Redis, workflows, topic names)
- ``sources``   webhook source configuration (signature scheme, secret, payload mapping)
- ``signatures`` the signature schemes (HubSpot v3, Stripe-style, GitHub-style, shared secret)
- ``webhooks``  ``POST /webhooks/{source}``
- ``keys``      per-tenant API keys (hashed in Redis) and ``agentfabric keys``
- ``runs``      ``POST /runs``, ``GET /runs/{id}``, ``GET /runs/{id}/events``
- ``runstore`` run status in Redis (``<prefix>:runs:<id>``), filled from the result topics
- ``app``       the Starlette app and the uvicorn server, liveness and readiness

Nothing happens on import.
"""

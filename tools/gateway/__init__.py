"""The tool gateway: every tool call an agent makes passes here (``tools.gateway``).

Modules (each owns one thing):

- ``spec``       the declaration of a tool (``ToolSpec``) and its policies (pydantic models)
- ``catalog``    where tool declarations come from (YAML, Python, entry points, module paths)
- ``identity``   short-lived signed agent tokens, scoped to the tools a step declares
- ``ratelimit``  shared rate limits (state in Redis, shared by every replica)
- ``breaker``    shared circuit breakers (state in Redis, bounded half-open probes)
- ``http``       HTTP tools (a declared request against a named service)
- ``openapi``    importing HTTP tools from an OpenAPI document
- ``audit``      audit events on the audit topic
- ``metrics``    prometheus metrics of the gateway
- ``pipeline``   the ``Gateway``: identity → scope → arguments → rate limit → breaker →
                 timeout → retry → result limits and redaction → audit

Nothing happens on import.
"""

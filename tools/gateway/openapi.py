"""Import HTTP tools from an OpenAPI 3 document (``agentfabric tools import-openapi``).

Each selected operation (by ``operationId``) becomes one :class:`~tools.gateway.spec.ToolSpec`:

- ``name``: the operationId, lower-cased (characters a tool name cannot hold become ``_``);
- ``description``: the summary, then the description;
- ``parameters``: one JSON-schema object merging the path and query parameters with the
  properties of the ``application/json`` request body (a body that is not an object goes
  under ``body``); local ``$ref`` s (``#/components/...``) are resolved inline, and the
  OpenAPI 3.0 dialect (``nullable``, boolean ``exclusiveMinimum``) becomes JSON Schema
  2020-12; header and cookie parameters are left out (the gateway sets its own headers);
- ``access``: read for GET and HEAD, write otherwise;
- ``http``: the method and path, on the named ``service`` or an absolute base ``url``.

The result is catalog YAML (``tools: [...]``), to review and extend with policies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agentfabric.errors import ConfigError
from schemas.serde import validation_reason

from .spec import ToolSpec

__all__ = ["catalog_yaml", "import_operations", "load_document", "operations", "tool_name"]

_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
_NOT_NAME = re.compile(r"[^a-z0-9_.-]+")
_MAX_REF_DEPTH = 64


def load_document(path: Path) -> dict[str, Any]:
    """An OpenAPI document from a JSON or YAML file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror})") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not JSON or YAML: {exc}") from exc
    if not isinstance(data, dict) or not str(data.get("openapi", "")).startswith("3."):
        raise ConfigError(f"{path} is not an OpenAPI 3 document (no `openapi: 3.x` field)")
    if not isinstance(data.get("paths"), dict):
        raise ConfigError(f"{path} has no `paths`")
    return data


def tool_name(operation_id: str) -> str:
    """The tool name of an operationId: lower-case, other characters as ``_``."""
    name = _NOT_NAME.sub("_", operation_id.strip().lower()).strip("_.-")
    if not name or not name[0].isalpha():
        name = f"op_{name}"
    return name[:128]


def operations(document: Mapping[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId -> (method, path, operation) of every operation that has an id."""
    found: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for path, item in document.get("paths", {}).items():
        if not isinstance(item, dict):
            continue
        for method in _METHODS:
            operation = item.get(method)
            if isinstance(operation, dict) and operation.get("operationId"):
                found[str(operation["operationId"])] = (method.upper(), path, operation)
    return found


def import_operations(document: Mapping[str, Any], select: Sequence[str], *,
                      service: str | None = None, url: str | None = None,
                      source: str = "") -> list[ToolSpec]:
    """The tools of the selected operations (by operationId, in the order given)."""
    if (service is None) == (url is None):
        raise ConfigError("give the service name (its URL comes from service_urls) or a base "
                          "url, exactly one")
    ops = operations(document)
    missing = [op for op in select if op not in ops]
    if missing:
        raise ConfigError(f"no operation {', '.join(missing)} in the document (operations: "
                          f"{', '.join(sorted(ops)) or 'none'})")
    if not select:
        raise ConfigError(f"select at least one operation (operations: "
                          f"{', '.join(sorted(ops)) or 'none'})")
    resolver = _Refs(document)
    specs = []
    for operation_id in select:
        method, path, operation = ops[operation_id]
        item = document["paths"][path]
        data = {
            "name": tool_name(operation_id),
            "description": _description(operation),
            "parameters": _parameters(resolver, item, operation, operation_id),
            "access": "read" if method in ("GET", "HEAD") else "write",
            "http": {"method": method if method != "HEAD" else "GET", "path": path,
                     **({"service": service} if service else {"url": url})},
            "source": source,
        }
        try:
            specs.append(ToolSpec.model_validate(data))
        except ValidationError as exc:
            raise ConfigError(f"operation {operation_id}: {validation_reason(exc)}") from exc
    return specs


def catalog_yaml(specs: Sequence[ToolSpec]) -> str:
    """Catalog YAML (``tools: [...]``) declaring ``specs`` (defaults left out)."""
    tools = []
    for spec in specs:
        dumped = spec.model_dump(mode="json", exclude_defaults=True, exclude={"source"})
        tool: dict[str, Any] = {"name": spec.name, "description": spec.description,
                                "access": spec.access, "parameters": spec.parameters}
        if spec.http is not None:
            tool["http"] = {"method": spec.http.method,
                            **spec.http.model_dump(exclude_defaults=True, exclude={"method"})}
        tool.update({k: v for k, v in dumped.items() if k not in tool})
        tools.append(tool)
    return yaml.safe_dump({"tools": tools}, sort_keys=False, allow_unicode=True, width=96)


def _description(operation: Mapping[str, Any]) -> str:
    parts = [str(operation.get(k, "")).strip() for k in ("summary", "description")]
    return " ".join(p for p in dict.fromkeys(parts) if p)


def _parameters(refs: _Refs, item: Mapping[str, Any], operation: Mapping[str, Any],
                operation_id: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    closed = False
    declared: dict[tuple[str, str], dict[str, Any]] = {}
    for raw in [*item.get("parameters", []), *operation.get("parameters", [])]:
        param = refs.resolve(raw)
        declared[(param.get("in", ""), param.get("name", ""))] = param  # operation's win
    for (where, name), param in declared.items():
        if where not in ("path", "query") or not name:
            continue
        schema = _dialect(refs.inline(param.get("schema", {})))
        if param.get("description") and "description" not in schema:
            schema = {**schema, "description": param["description"]}
        properties[name] = schema
        if where == "path" or param.get("required"):
            required.append(name)
    body = refs.resolve(operation.get("requestBody", {}))
    schema = body.get("content", {}).get("application/json", {}).get("schema")
    if schema is not None:
        schema = _dialect(refs.inline(schema))
        if schema.get("type") == "object" or "properties" in schema:
            for name, prop in schema.get("properties", {}).items():
                if name in properties:
                    raise ConfigError(f"operation {operation_id}: the body field '{name}' has "
                                      f"the name of a path or query parameter")
                properties[name] = prop
            required += [n for n in schema.get("required", []) if n not in required]
            closed = schema.get("additionalProperties") is False
        else:
            properties["body"] = schema
            if body.get("required"):
                required.append("body")
    result: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        result["required"] = required
    if closed:  # the body allows no other fields; path and query ones are all declared
        result["additionalProperties"] = False
    return result


class _Refs:
    """Resolves local ``$ref`` s (``#/...``) of one document."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document

    def target(self, ref: str) -> Any:
        if not ref.startswith("#/"):
            raise ConfigError(f"$ref {ref} is not local; only #/... references are resolved")
        node: Any = self.document
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"$ref {ref} points nowhere")
            node = node[part]
        return node

    def resolve(self, node: Any) -> dict[str, Any]:
        """A node that may be a ``$ref`` (followed until it is not one)."""
        for _ in range(_MAX_REF_DEPTH):
            if not (isinstance(node, Mapping) and "$ref" in node):
                return dict(node) if isinstance(node, Mapping) else {}
            node = self.target(str(node["$ref"]))
        raise ConfigError("a $ref chain is too long (a cycle?)")

    def inline(self, node: Any, seen: tuple[str, ...] = ()) -> Any:
        """``node`` with every ``$ref`` replaced by its target (recursive schemas refused)."""
        if isinstance(node, Mapping):
            if "$ref" in node:
                ref = str(node["$ref"])
                if ref in seen:
                    raise ConfigError(f"schema {ref} refers to itself; a tool's parameters "
                                      f"cannot be recursive")
                if len(seen) >= _MAX_REF_DEPTH:
                    raise ConfigError(f"$ref {ref} nests too deeply")
                siblings = {k: v for k, v in node.items() if k != "$ref"}
                return {**self.inline(self.target(ref), (*seen, ref)),
                        **self.inline(siblings, seen)}
            return {k: self.inline(v, seen) for k, v in node.items()}
        if isinstance(node, list):
            return [self.inline(v, seen) for v in node]
        return node


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then",
               "else", "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")


def _dialect(node: Any) -> Any:
    """An OpenAPI 3.0 schema as JSON Schema 2020-12 (``nullable``, boolean exclusive bounds,
    ``example``); a 3.1 schema passes unchanged. Walks subschemas only (never values like
    ``enum`` or ``default``, nor property names)."""
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("nullable", "example"):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, Mapping):
            out[key] = {name: _dialect(sub) for name, sub in value.items()}
        elif key in _SCHEMA_ONE:
            out[key] = _dialect(value)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_dialect(sub) for sub in value]
        else:
            out[key] = value
    if "example" in node and "examples" not in node:
        out["examples"] = [node["example"]]
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), bool):
            if node[bound] and limit in node:
                out[bound] = out.pop(limit)
            else:
                out.pop(bound)
    if node.get("nullable") is True:
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
        elif isinstance(kind, list) and "null" not in kind:
            out["type"] = [*kind, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out

"""Where tool declarations come from: YAML files, Python functions, installed packages.

A catalog holds each tool's :class:`~tools.gateway.spec.ToolSpec` (its declaration and policies)
and, for a Python tool, the function that implements it. Sources, in the order
:meth:`Catalog.load` reads them:

1. the shipped catalog, ``tools/catalog/*.yaml``;
2. every ``*.yaml``/``*.yml`` file in each folder of the ``tools_dirs`` setting;
3. entry points of the group ``agentfabric.tools`` of installed packages: each is a callable
   taking the catalog (``def register(catalog): ...``);
4. each module named in the ``tool_modules`` setting: it has ``register(catalog)``.

A YAML file holds ``tools: [ ... ]``, each item a ToolSpec. In Python::

    @catalog.register("crm.note", NoteArgs, access="write", scopes=["crm:write"],
                      rate_limit="5/second")
    async def note(args: NoteArgs, call: ToolCall) -> dict[str, Any]: ...

Two declarations of one name are a ConfigError naming both sources.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import yaml
from pydantic import BaseModel, ValidationError

from agentfabric.errors import (
    AgentFabricError,
    ConfigError,
    PermanentError,
    ScopeError,
    ToolArgumentsError,
    ToolError,
    TransientError,
)
from schemas.serde import validation_reason
from tools.registry import ToolCall, ToolRegistry

from .redact import sanitize_error
from .spec import ToolSpec

if TYPE_CHECKING:
    from agentfabric.settings import Settings

__all__ = ["ENTRY_POINT_GROUP", "Catalog", "PythonTool", "shipped_catalog_dir"]

ENTRY_POINT_GROUP = "agentfabric.tools"
ToolFn = Callable[..., Any] | Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class PythonTool:
    """How to run a Python tool: ``fn(args)`` or ``fn(args, call=call)``; ``args`` is an
    instance of ``args_model`` when there is one, else the arguments dict."""

    fn: ToolFn
    args_model: type[BaseModel] | None
    wants_call: bool
    is_async: bool


    async def run(self, name: str, model_args: BaseModel | None, arguments: Mapping[str, Any],
                  call: ToolCall) -> Any:
        """Call the function (a sync one in a worker thread, so it never blocks the event
        loop; it cannot be stopped, so on a timeout it runs on and its answer is dropped).
        Its own bugs become a ToolError naming their type; connection errors and timeouts a
        TransientError; our errors pass, their text sanitized."""
        args: Any = model_args if self.args_model is not None else dict(arguments)
        kwargs: dict[str, Any] = {"call": call} if self.wants_call else {}
        try:
            if self.is_async:
                result = self.fn(args, **kwargs)
            else:
                result = await asyncio.to_thread(self.fn, args, **kwargs)
            if inspect.isawaitable(result):  # a sync function that returned a coroutine
                result = await result
        except AgentFabricError as exc:
            clean = _sanitized(exc)
            if clean is exc:
                raise
            raise clean from exc
        except (ConnectionError, TimeoutError) as exc:
            raise TransientError(f"tool '{name}' failed with {type(exc).__name__}: "
                                 f"{sanitize_error(str(exc), 300)}") from exc
        except Exception as exc:  # a tool's own bug: permanent, with its type, never a crash
            raise ToolError(f"tool '{name}' failed with {type(exc).__name__}: "
                            f"{sanitize_error(str(exc), 300)}") from exc
        return result


def _sanitized(exc: AgentFabricError) -> AgentFabricError:
    """``exc`` with its text sanitized (same class), when that class takes just a text."""
    text = str(exc)
    clean = sanitize_error(text, 600)
    if clean == text or type(exc) not in (ToolError, ToolArgumentsError, TransientError,
                                          PermanentError, ScopeError):
        return exc
    return type(exc)(clean)


def _import_path(fn: ToolFn) -> str | None:
    """``module:function`` of a module-level function, else None (a lambda, a method)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module and qualname.isidentifier():
        return f"{module}:{qualname}"
    return None


def _is_async(fn: ToolFn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _python_tool(fn: ToolFn, args_model: type[BaseModel] | None) -> PythonTool:
    return PythonTool(fn, args_model, "call" in inspect.signature(fn).parameters, _is_async(fn))


def _first_param_model(fn: ToolFn) -> type[BaseModel] | None:
    """The pydantic model a function's first parameter is annotated with, if any."""
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return None
    try:
        hint = get_type_hints(fn).get(params[0].name)
    except (NameError, TypeError):
        return None
    return hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


def shipped_catalog_dir() -> Path:
    """The folder of the shipped tool declarations (``tools/catalog``)."""
    return Path(str(resources.files("tools").joinpath("catalog")))


class Catalog:
    """Tool declarations by name, with the implementations of the Python tools."""

    def __init__(self) -> None:
        self._specs: dict[str, ToolSpec] = {}
        self._python: dict[str, PythonTool] = {}

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def specs(self) -> list[ToolSpec]:
        return [self._specs[name] for name in self.names()]

    def spec(self, name: str) -> ToolSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise ConfigError(f"no tool named '{name}' is declared (known: "
                              f"{', '.join(self.names()) or 'none'}); declare it in a "
                              f"catalog file or register it in Python") from None

    def python(self, name: str) -> PythonTool:
        """The implementation of a Python tool (imported on first use for a YAML one)."""
        found = self._python.get(name)
        if found is not None:
            return found
        spec = self.spec(name)
        if spec.python is None:
            raise ConfigError(f"tool '{name}' ({spec.source}) has no implementation: give it "
                              f"`http:` or `python: module:function`")
        module_name, _, attr = spec.python.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"tool '{name}' ({spec.source}): cannot import {spec.python} "
                              f"({type(exc).__name__}: {exc})") from exc
        if not callable(fn):
            raise ConfigError(f"tool '{name}' ({spec.source}): {spec.python} is not callable")
        found = self._python[name] = _python_tool(fn, _first_param_model(fn))
        return found

    # ------------------------------------------------------------------ adding

    def add(self, spec: ToolSpec, implementation: PythonTool | None = None) -> ToolSpec:
        """Add one declaration; a name declared twice is a ConfigError naming both sources."""
        before = self._specs.get(spec.name)
        if before is not None:
            raise ConfigError(f"tool '{spec.name}' is declared twice: in {before.source or '?'} "
                              f"and in {spec.source or '?'}; rename or remove one")
        self._specs[spec.name] = spec
        if implementation is not None:
            self._python[spec.name] = implementation
        return spec

    def register(self, name: str, args: type[BaseModel], *, description: str = "",
                 access: str = "read", source: str | None = None,
                 **policies: Any) -> Callable[[ToolFn], ToolFn]:
        """Decorator: declare the function as tool ``name`` whose arguments are ``args``
        (their JSON schema is what the model sees). ``policies`` are ToolSpec fields:
        ``scopes``, ``timeout_s``, ``retry``, ``rate_limit``, ``breaker``, ``approval``,
        ``fallback``, ``max_result_bytes``, ``redact``."""

        def decorator(fn: ToolFn) -> ToolFn:
            where = source or f"python {fn.__module__}.{getattr(fn, '__qualname__', fn)}"
            data = {"name": name, "description": description or (fn.__doc__ or "").strip(),
                    "parameters": args.model_json_schema(), "access": access,
                    "python": _import_path(fn), "source": where, **policies}
            self.add(_validated(data, where), _python_tool(fn, args))
            return fn

        return decorator

    def add_registry(self, registry: ToolRegistry, source: str = "tool registry") -> None:
        """Declare every tool of a :class:`~tools.registry.ToolRegistry` (read access, default
        policies, no scopes)."""
        for name in registry.names():
            tool = registry.get(name)
            where = f"{source} ({tool.fn.__module__})"
            self.add(_validated({"name": name, "description": tool.description,
                                 "parameters": tool.parameters,
                                 "python": _import_path(tool.fn), "source": where}, where),
                     PythonTool(tool.fn, tool.args_model, tool.wants_call, tool.is_async))

    def load_yaml(self, path: Path) -> list[str]:
        """Declare the tools of one YAML file (``tools: [ ... ]``); returns their names."""
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read tool catalog {path} ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"tool catalog {path} is not YAML: {exc}") from exc
        if data is None:
            return []
        if not isinstance(data, dict) or not isinstance(data.get("tools"), list) \
                or set(data) - {"tools"}:
            raise ConfigError(f"tool catalog {path} must be a mapping with one key, `tools:`, "
                              f"holding a list of tools")
        names = []
        for i, item in enumerate(data["tools"]):
            where = f"{path} (tool {i + 1})"
            if not isinstance(item, dict):
                raise ConfigError(f"{where}: a tool is a mapping, not {type(item).__name__}")
            if "name" in item:
                where = f"{path} (tool '{item['name']}')"
            names.append(self.add(_validated({**item, "source": str(path)}, where)).name)
        return names

    def load_dir(self, folder: Path) -> list[str]:
        """Declare the tools of every ``*.yaml``/``*.yml`` file in ``folder`` (sorted)."""
        if not folder.is_dir():
            raise ConfigError(f"tools folder {folder} does not exist (tools_dirs setting)")
        files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
        return [name for path in files for name in self.load_yaml(path)]

    def load_module(self, module_name: str) -> None:
        """Import ``module_name`` and call its ``register(catalog)``."""
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import tool module '{module_name}' (tool_modules "
                              f"setting): {exc}") from exc
        register = getattr(module, "register", None)
        if not callable(register):
            raise ConfigError(f"tool module '{module_name}' has no register(catalog) function")
        register(self)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Call every installed entry point of ``group`` with this catalog; returns their
        names."""
        loaded = []
        for entry in importlib.metadata.entry_points(group=group):
            try:
                register = entry.load()
            except Exception as exc:  # an installed plug-in's import failure: say which
                raise ConfigError(f"entry point '{entry.name} = {entry.value}' (group {group}) "
                                  f"cannot be loaded: {type(exc).__name__}: {exc}") from exc
            if not callable(register):
                raise ConfigError(f"entry point '{entry.name} = {entry.value}' (group {group}) "
                                  f"is not callable; it should be register(catalog)")
            register(self)
            loaded.append(entry.name)
        return loaded

    def check(self) -> None:
        """Every fallback names a declared tool (else ConfigError)."""
        for spec in self._specs.values():
            if spec.fallback is not None and spec.fallback.tool is not None \
                    and spec.fallback.tool not in self._specs:
                raise ConfigError(f"tool '{spec.name}' ({spec.source}) falls back to "
                                  f"'{spec.fallback.tool}', which is not declared")

    # ------------------------------------------------------------------ building

    @classmethod
    def load(cls, settings: Settings, *, shipped: bool = True,
             entry_points: bool = True) -> Catalog:
        """The catalog of a deployment: shipped YAML, ``tools_dirs``, entry points,
        ``tool_modules`` (see the module docstring), checked."""
        catalog = cls()
        if shipped:
            catalog.load_dir(shipped_catalog_dir())
        for folder in settings.tools_dirs:
            catalog.load_dir(Path(folder))
        if entry_points:
            catalog.load_entry_points()
        for module_name in settings.tool_modules:
            catalog.load_module(module_name)
        catalog.check()
        return catalog

    @classmethod
    def of(cls, specs: Iterable[ToolSpec]) -> Catalog:
        """A catalog of the given declarations (tests, tools)."""
        catalog = cls()
        for spec in specs:
            catalog.add(spec)
        return catalog


def _validated(data: dict[str, Any], where: str) -> ToolSpec:
    try:
        return ToolSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {validation_reason(exc)}") from exc

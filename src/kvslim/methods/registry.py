"""Methods register by name; :func:`policy` builds one from a spec such as ``"snapkv"``,
``"snapkv(keep=0.25,window=32)"``, the hybrid ``"snapkv+kivi2"`` (evict, then store what is kept packed) or
a wrapper around a scorer, ``"adakv(expected_attention,keep=0.25)"`` (a method with a ``wrap`` classmethod
takes another method's spec as its first argument)."""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from torch import Tensor

from .base import Method, Observation

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to :func:`policy` under ``cls.name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


def parameters(cls: type[Method]) -> list[dict[str, Any]]:
    """The tunable parameters of a method: name, type and default."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default})
    return out


def describe() -> list[dict[str, Any]]:
    """Every registered method with its one-line summary, paper and parameters (for ``kvslim methods``)."""
    return [
        {"name": n, "summary": c.summary, "paper": c.paper, "parameters": parameters(c)}
        for n, c in sorted(METHODS.items())
    ]


def _type_name(t: Any) -> str:
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return "|".join(_type_name(a) for a in args) if args else getattr(t, "__name__", str(t))


def _coerce(cls: type[Method], name: str, text: str) -> Any:
    """Turn a spec's string value into the parameter's declared type."""
    hint = typing.get_type_hints(cls)[name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if text.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    for kind in kinds:
        try:
            if kind is bool:
                if text.lower() in ("true", "false", "1", "0"):
                    return text.lower() in ("true", "1")
                continue
            return kind(text)
        except (TypeError, ValueError):
            continue
    raise ValueError(f"{cls.name}: {name}={text!r} is not a valid {_type_name(hint)}")


_TERM = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?:\((.*)\))?\s*$")


Term = tuple[str, dict[str, str], "str | None"]  # name, its parameters as text, the spec it wraps


def _parse_term(term: str) -> Term:
    match = _TERM.match(term)
    if not match:
        raise ValueError(f"cannot parse method spec {term!r}: write NAME or NAME(param=value,...)")
    name, body = match.group(1), match.group(2)
    params: dict[str, str] = {}
    wrapped = None
    for position, item in enumerate(filter(None, (p.strip() for p in _split_top(body or "", ",")))):
        if "=" not in item.split("(", 1)[0]:
            if position:
                raise ValueError(f"{name}: parameter {item!r} needs the form param=value (only the first argument "
                                 "may be a method, as in adakv(expected_attention,keep=0.25))")
            wrapped = item
            continue
        key, value = (x.strip() for x in item.split("=", 1))
        params[key] = value
    return name, params, wrapped


def _names(term: Term) -> list[str]:
    """The method names a term builds, the wrapper's first."""
    name, _, wrapped = term
    return [name, *(_names(_parse_term(wrapped)) if wrapped else [])]


def _build(name: str, text_params: dict[str, str], params: dict[str, Any], wrapped: str | None = None) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    if wrapped is not None:
        return _wrap(cls, text_params, params, wrapped)
    valid = {p["name"] for p in parameters(cls)}
    unknown = sorted(set(text_params) - valid)
    if unknown:
        raise ValueError(f"{name}: unknown parameter {', '.join(unknown)}; valid parameters: {', '.join(sorted(valid)) or 'none'}")
    kwargs = {k: v for k, v in params.items() if k in valid}
    kwargs.update({k: _coerce(cls, k, v) for k, v in text_params.items()})
    try:
        return cls(**kwargs)
    except TypeError as err:  # e.g. a value of the wrong type reaching a comparison
        raise ValueError(f"{name}: invalid parameters {kwargs}: {err}") from None


def policy(spec: "str | Method", **params: Any) -> Method:
    """Build a method from a registered name or spec; keyword parameters go to every part that accepts them.

    ``policy("snapkv", keep=0.25)``, ``policy("streaming(sinks=4)", keep=0.1)``, ``policy("snapkv+kivi2", keep=0.25)``.
    Unknown names or parameters and invalid values raise ``ValueError`` naming the valid choices.
    """
    if isinstance(spec, Method):
        if params:
            raise ValueError("parameters go with a spec string, not with an already built method")
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy spec must be a non-empty string such as 'snapkv'; valid methods: {', '.join(sorted(METHODS))}")
    terms = [_parse_term(t) for t in _split_top(spec, "+")]
    names = [n for term in terms for n in _names(term)]
    accepted = {p["name"] for name in names if name in METHODS for p in parameters(METHODS[name])}
    unused = sorted(set(params) - accepted)
    if unused and all(name in METHODS for name in names):
        raise ValueError(f"{spec}: no part takes parameter {', '.join(unused)}; valid parameters: {', '.join(sorted(accepted))}")
    methods = [_build(name, text, params, wrapped) for name, text, wrapped in terms]
    return methods[0] if len(methods) == 1 else Chain(methods)


def _wrap(cls: type[Method], text_params: dict[str, str], params: dict[str, Any], wrapped: str) -> Method:
    """``cls`` wrapped around the method ``wrapped`` builds: the wrapper takes its own ``wrap`` parameters, every
    other parameter goes to the wrapped method."""
    wrap = getattr(cls, "wrap", None)
    if wrap is None:
        wrappers = sorted(n for n, c in METHODS.items() if hasattr(c, "wrap"))
        raise ValueError(f"{cls.name} does not wrap another method; methods that do: {', '.join(wrappers)}")
    own = set(typing.get_type_hints(wrap)) - {"scorer", "return"}
    name, inner_text, inner_wrapped = _parse_term(wrapped)
    inner_text = {**inner_text, **{k: v for k, v in text_params.items() if k not in own}}
    # a wrapper that sets its scorer's budget itself (auto) builds the scorer with ``scorer_defaults`` (keep=1)
    inner_params = {**getattr(cls, "scorer_defaults", {}), **{k: v for k, v in params.items() if k not in own}}
    inner = _build(name, inner_text, inner_params, inner_wrapped)
    kwargs = {k: v for k, v in params.items() if k in own}
    kwargs.update({k: _coerce(cls, k, v) for k, v in text_params.items() if k in own})
    return wrap(inner, **kwargs)


def _split_top(spec: str, sep: str) -> list[str]:
    """Split a spec on ``sep`` outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "(") - (ch == ")")
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


@dataclasses.dataclass
class Chain(Method):
    """A hybrid: each part acts in turn on what the previous one kept (e.g. evict, then quantize)."""

    parts: list[Method] = dataclasses.field(default_factory=list)
    name: typing.ClassVar[str] = "chain"

    def validate(self) -> None:
        if len(self.parts) < 2:
            raise ValueError("a hybrid needs at least two parts, e.g. 'snapkv+kivi2'")
        for position, part in enumerate(self.parts):
            part.check_hybrid(self.parts, position)

    def _fresh(self, obs: Observation) -> Observation:
        return Observation(obs.layer, obs.num_layers, obs.queries, obs.scaling, obs.phase, obs.softcap, obs.rope)

    def on_prefill(self, obs: Observation) -> None:
        for part in self.parts:
            part.before_prefill(self._fresh(obs))
        for part in self.parts:
            part.on_prefill(self._fresh(obs))

    def on_decode(self, obs: Observation) -> None:
        for part in self.parts:
            part.on_decode(self._fresh(obs))

    def reflow(self, obs: Observation, keep: Tensor) -> None:
        for part in self.parts:
            part.reflow(obs, keep)

    def on_probe(self, obs: Observation, keys: Tensor, real: Tensor) -> None:
        for part in self.parts:
            part.on_probe(self._fresh(obs), keys, real)

    def on_probed(self, obs: Observation) -> None:
        for part in self.parts:
            part.on_probed(self._fresh(obs))

    @property
    def probes(self) -> bool:  # type: ignore[override]
        return any(p.probes for p in self.parts)

    def planned_tokens(self, n_tokens: int, layer_idx: int, num_layers: int) -> float:
        return min(p.planned_tokens(n_tokens, layer_idx, num_layers) for p in self.parts)

    def storage_bytes(self, shape, tokens):  # type: ignore[no-untyped-def]
        return self.parts[-1].storage_bytes(shape, tokens)

    @property
    def spec(self) -> str:
        return "+".join(p.spec for p in self.parts)

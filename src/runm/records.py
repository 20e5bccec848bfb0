"""``@record``: a dataclass that is quick to define.

Every runm command is a new interpreter, and defining a dataclass costs ~0.7 ms, most of it
``exec`` of the generated ``__eq__`` and ``__repr__`` (and ``inspect.signature`` for a class
without a docstring). The ~100 classes a start imports cost ~25 ms more that way. A record is a
plain dataclass (``fields``, ``replace``, ``asdict`` and typing work as usual) whose ``__eq__``,
``__repr__`` and, when frozen, ``__hash__`` are shared functions with the same behaviour.
Used by the guest agent too (copied into the guest image): standard library only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["record"]

_T = TypeVar("_T")

# per class: names of the fields that take part in ==/hash, and in repr()
_COMPARED = "__record_compared__"
_SHOWN = "__record_shown__"


def _values(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, name) for name in getattr(obj, _COMPARED))


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _repr(self: Any) -> str:
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in getattr(self, _SHOWN))
    return f"{self.__class__.__qualname__}({shown})"


def _make(cls: type[_T], frozen: bool, slots: bool) -> type[_T]:
    body = cls.__dict__
    if not body.get("__doc__"):
        # dataclass() would render inspect.signature(cls) as the docstring
        cls.__doc__ = f"{cls.__name__}({', '.join(body.get('__annotations__', ()))})"
    own_eq = "__eq__" in body
    own_hash = "__hash__" in body and not (body["__hash__"] is None and own_eq)
    made: Any = dataclass(cls, eq=False, repr=False, frozen=frozen, slots=slots)
    made_fields = fields(made)
    setattr(made, _COMPARED, tuple(f.name for f in made_fields if f.compare))
    setattr(made, _SHOWN, tuple(f.name for f in made_fields if f.repr))
    if "__repr__" not in body:
        made.__repr__ = _repr
    if not own_eq:
        made.__eq__ = _eq
        if not own_hash:
            # as dataclass(eq=True): frozen records hash by value, others are unhashable
            made.__hash__ = _hash if frozen else None
    return made  # type: ignore[no-any-return]


@overload
@dataclass_transform(field_specifiers=(field,))
def record(cls: type[_T], /) -> type[_T]: ...


@overload
def record(*, frozen: bool = False, slots: bool = False) -> Callable[[type[_T]], type[_T]]: ...


def record(cls: type[_T] | None = None, /, *, frozen: bool = False,
           slots: bool = False) -> type[_T] | Callable[[type[_T]], type[_T]]:
    """Make cls a dataclass (``@record`` or ``@record(frozen=True, slots=True)``)."""
    if cls is None:
        return lambda c: _make(c, frozen, slots)
    return _make(cls, frozen, slots)

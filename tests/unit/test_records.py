"""@record behaves as @dataclass does for ==, hash and repr (it only defines them faster)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from runm.records import record


@record
class Point:
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)
    note: str = field(default="", compare=False, repr=False)


@dataclass
class PointDC:
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)
    note: str = field(default="", compare=False, repr=False)


@record(frozen=True, slots=True)
class Frozen:
    a: int
    b: str = "b"


@dataclass(frozen=True, slots=True)
class FrozenDC:
    a: int
    b: str = "b"


@record
class Sub(Point):
    z: int = 9


@record
class OwnEq:
    v: int

    def __eq__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "mine"


def test_repr_matches_dataclass() -> None:
    assert repr(Point(1, 2, ["t"], "hidden")) == repr(PointDC(1, 2, ["t"], "hidden")).replace(
        "PointDC", "Point")
    assert repr(Frozen(3)) == "Frozen(a=3, b='b')"
    assert repr(Sub(1)) == "Sub(x=1, y=0, tags=[], z=9)"


def test_equality_by_compared_fields_and_exact_class() -> None:
    assert Point(1, 2, note="a") == Point(1, 2, note="b")  # note: compare=False
    assert Point(1, 2) != Point(1, 3)
    assert Point(1) != Sub(1)  # as dataclasses: other classes are never equal
    assert Point(1).__eq__(PointDC(1)) is NotImplemented
    assert Frozen(1) == Frozen(1) and Frozen(1) != Frozen(2)


def test_hash_as_dataclass() -> None:
    assert hash(Frozen(1, "x")) == hash(Frozen(1, "x"))
    assert len({Frozen(1), Frozen(1), Frozen(2)}) == 2
    with pytest.raises(TypeError):
        hash(Point(1))  # eq without frozen: unhashable, as @dataclass
    with pytest.raises(TypeError):
        hash(PointDC(1))


def test_frozen_slots_and_dataclass_helpers_work() -> None:
    f = Frozen(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.a = 2  # type: ignore[misc]
    assert not hasattr(f, "__dict__")
    assert not hasattr(FrozenDC(1), "__dict__")
    assert dataclasses.replace(f, b="c") == Frozen(1, "c")
    assert dataclasses.asdict(Sub(1, tags=["t"])) == {"x": 1, "y": 0, "tags": ["t"], "note": "",
                                                      "z": 9}
    assert Point.__match_args__ == ("x", "y", "tags", "note")


def test_class_methods_of_its_own_are_kept() -> None:
    assert OwnEq(1) == OwnEq(2)
    assert repr(OwnEq(1)) == "mine"


def test_docstring_without_signature() -> None:
    assert Point.__doc__ == "Point(x, y, tags, note)"
    assert record.__doc__ and "dataclass" in record.__doc__

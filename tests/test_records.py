"""qmigx.records: the value classes behave as the dataclasses they replace."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import ClassVar, Optional

import pytest

from qmigx.records import FrozenRecordError, Record, factory, fields, replace
from qmigx.savevm import DeviceState, Section
from qmigx.stream import RamBlockInfo, SectionData
from qmigx.wire import SectionType


class Point(Record):
    x: int
    y: int = 0
    tags: list = factory(list)
    unit: ClassVar[str] = "px"


class Point3(Point):
    z: int = 0


class Counter(Record, mutable=True):
    name: str
    hits: int = 0

    def __post_init__(self) -> None:
        self.seen = self.name.upper()


@dataclasses.dataclass(frozen=True)
class PointDC:
    x: int
    y: int = 0
    tags: list = dataclasses.field(default_factory=list)


def test_construction_matches_a_dataclass():
    for args, kw in (((1,), {}), ((1, 2), {}), ((), {"x": 3, "y": 4}), ((5,), {"tags": [1]})):
        r, d = Point(*args, **kw), PointDC(*args, **kw)
        assert (r.x, r.y, r.tags) == (d.x, d.y, d.tags)
    assert fields(Point) == ("x", "y", "tags")
    assert fields(Point3) == ("x", "y", "tags", "z")
    assert Point3(1, z=9).z == 9 and Point3(1).y == 0
    assert Point.unit == "px" and "unit" not in fields(Point)


def test_each_instance_gets_its_own_factory_default():
    a, b = Point(1), Point(2)
    a.tags.append("a")
    assert b.tags == [] and a.tags == ["a"]
    assert not hasattr(Point, "tags")


@pytest.mark.parametrize("args, kw, message", [
    ((), {}, "missing argument 'x'"),
    ((1, 2, [], 4), {}, "takes 3 positional arguments but 4 were given"),
    ((1,), {"x": 2}, "multiple values for argument 'x'"),
    ((1,), {"w": 2}, "unexpected keyword argument 'w'"),
])
def test_bad_arguments_are_type_errors(args, kw, message):
    with pytest.raises(TypeError, match=message):
        Point(*args, **kw)


def test_a_field_without_default_after_one_with_is_refused():
    with pytest.raises(TypeError, match="'b' without a default"):
        class Bad(Record):
            a: int = 0
            b: int


def test_equality_and_hash_are_by_value_and_class():
    assert Point(1, 2) == Point(1, 2) and Point(1, 2) != Point(1, 3)
    assert Point(1, 2) != Point3(1, 2) and Point(1, 2) != (1, 2, [])
    s1, s2 = Section(2, "ram", 0, 4), Section(2, "ram", 0, 4)
    assert s1 == s2 and hash(s1) == hash(s2) and len({s1, s2}) == 1
    assert Section(3, "ram", 0, 4) not in {s1}


def test_frozen_records_refuse_changes():
    s = Section(2, "ram", 0, 4)
    with pytest.raises(FrozenRecordError):
        s.idstr = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del s.idstr  # type: ignore[misc]
    assert s.idstr == "ram"


def test_mutable_records_change_run_post_init_and_are_unhashable():
    c = Counter("a")
    assert c.seen == "A"
    c.hits += 1
    assert c == Counter("a", 1)
    with pytest.raises(TypeError):
        hash(c)
    d = DeviceState("dev", 0, 1, b"x")
    d.payload = b"y"
    assert d.vmdesc is None and d.payload == b"y"


def test_repr_names_every_field():
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags=[])"
    assert repr(Section(2, "ram", 0, 4)) == \
        "Section(section_id=2, idstr='ram', instance_id=0, version_id=4)"


def test_replace_copy_and_pickle_keep_the_value():
    ev = SectionData(SectionType.SECTION_FULL, Section(3, "timer", 0, 2), b"\x01", 100)
    ev2 = replace(ev, payload=b"\x02", value={"a": 1})
    assert ev2.payload == b"\x02" and ev2.value == {"a": 1} and ev2.section == ev.section
    assert ev.payload == b"\x01"
    with pytest.raises(TypeError, match="unexpected keyword"):
        replace(ev, nothing=1)
    for clone in (copy.copy(ev), copy.deepcopy(ev), pickle.loads(pickle.dumps(ev))):
        assert clone == ev and clone is not ev
    info = RamBlockInfo("pc.ram", 1 << 20)
    assert pickle.loads(pickle.dumps(info)) == info and info.gpa is None


def test_optional_annotations_are_fields():
    class WithOptional(Record):
        a: Optional[int] = None

    assert fields(WithOptional) == ("a",) and WithOptional().a is None

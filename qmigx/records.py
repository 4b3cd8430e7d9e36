"""Value classes declared by annotations, made without generating code.

``@dataclass`` compiles an ``__init__``, ``__repr__``, ``__eq__`` (and for
frozen classes ``__hash__``, ``__setattr__``, ``__delattr__``) for every
class as its module is imported, and imports ``inspect`` to do it. That
is about a millisecond a class: the stream's record types alone cost a
short process such as ``qmigx analyze`` a tenth of its run. A
:class:`Record` gives the same behaviour to a class from generic methods
that read the field list once, when the class is made.

Subclass :class:`Record` and annotate the fields (defaults as class
attributes, :func:`factory` for a fresh default per instance). Records are
frozen unless the class says ``mutable=True``; ``__post_init__`` runs after
``__init__`` as with a dataclass. :func:`replace` is ``dataclasses.replace``.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

__all__ = ["Record", "FrozenRecordError", "factory", "replace", "fields"]

try:
    from typing import dataclass_transform
except ImportError:  # Python 3.10: the decorator only informs type checkers
    def dataclass_transform(**_kw):  # type: ignore[no-redef]
        return lambda cls: cls

_T = TypeVar("_T", bound="Record")


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def factory(make: Callable[[], Any]) -> Any:
    """A default made afresh for each instance (``field(default_factory=make)``)."""
    return _Factory(make)


class FrozenRecordError(AttributeError):
    """An attempt to change a field of a frozen record."""


@dataclass_transform(frozen_default=True, field_specifiers=(factory,))
class Record:
    """Base of the value classes; see the module docstring."""

    _fields: tuple[str, ...] = ()
    _defaults: dict[str, Any] = {}
    _mutable = False

    def __init_subclass__(cls, mutable: bool = False, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        own = [name for name, kind in cls.__dict__.get("__annotations__", {}).items()
               if not str(kind).startswith(("ClassVar", "typing.ClassVar"))]
        defaults = dict(cls._defaults)
        for name in own:
            if name in cls.__dict__:
                defaults[name] = cls.__dict__[name]
                if isinstance(defaults[name], _Factory):
                    delattr(cls, name)  # an instance always has its own value
            elif name in defaults:
                del defaults[name]
        names = cls._fields + tuple(n for n in own if n not in cls._fields)
        seen_default = False
        for name in names:
            if name in defaults:
                seen_default = True
            elif seen_default:
                raise TypeError(f"{cls.__name__}: field {name!r} without a default "
                                "follows one with a default")
        cls._fields = names
        cls._defaults = defaults
        cls._mutable = mutable
        if mutable:
            cls.__hash__ = None  # type: ignore[assignment] - equal by value, so unhashable

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes {len(names)} positional "
                            f"arguments but {len(args)} were given")
        d = self.__dict__
        for name, value in zip(names, args):
            d[name] = value
        for name in names[len(args):]:
            if name in kwargs:
                d[name] = kwargs.pop(name)
            elif name in self._defaults:
                value = self._defaults[name]
                d[name] = value.make() if isinstance(value, _Factory) else value
            else:
                raise TypeError(f"{type(self).__name__}() missing argument {name!r}")
        if kwargs:
            bad = next(iter(kwargs))
            what = "got multiple values for" if bad in names else "got an unexpected keyword"
            raise TypeError(f"{type(self).__name__}() {what} argument {bad!r}")
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()

    def __repr__(self) -> str:
        d = self.__dict__
        inner = ", ".join(f"{n}={d[n]!r}" for n in self._fields)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        d, o = self.__dict__, other.__dict__
        return all(d[n] == o[n] for n in self._fields)

    def __hash__(self) -> int:
        d = self.__dict__
        return hash(tuple(d[n] for n in self._fields))

    def __setattr__(self, name: str, value: Any) -> None:
        if not self._mutable:
            raise FrozenRecordError(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if not self._mutable:
            raise FrozenRecordError(f"cannot delete field {name!r}")
        object.__delattr__(self, name)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def fields(obj: Record | type[Record]) -> tuple[str, ...]:
    """The field names of a record (or record class), in order."""
    return obj._fields


def replace(obj: _T, **changes: Any) -> _T:
    """A copy of ``obj`` with ``changes`` (``dataclasses.replace`` for records)."""
    d = obj.__dict__
    return type(obj)(**{n: changes.pop(n) if n in changes else d[n] for n in obj._fields},
                     **changes)

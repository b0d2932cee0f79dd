"""What a database holds, and the first document in which two databases differ.

The checks run the same events in different ways and compare what the
handlers left behind. Documents are compared as MongoDB means them, not as
Python happens to hold them:

- field order does not matter (``{a, b}`` is ``{b, a}``);
- dates compare to the millisecond (what a BSON date holds), a naive one as UTC;
- numbers compare by value (``1`` is ``1.0``), but a bool is not a number;
- arrays compare **as multisets** by default: ``$addToSet`` and ``$push`` of the
  same elements in another order record the same facts. ``ordered_arrays=True``
  makes their order count.

:func:`snapshot` works on any database of either driver, or mongomock-motor's.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

__all__ = [
    "Difference",
    "Snapshot",
    "canonical",
    "copy_database",
    "field_value",
    "first_difference",
    "snapshot",
]

#: collection -> documents, in the order the collection returns them.
Snapshot: TypeAlias = dict[str, list[dict[str, Any]]]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_shown = reprlib.Repr()
_shown.maxstring = 80
_shown.maxother = 80
_shown.maxlist = 8
_shown.maxdict = 12
_shown.maxlevel = 4


async def snapshot(database: Any) -> Snapshot:
    """Every document of every collection (``system.*`` ones left out)."""
    names = sorted(await database.list_collection_names())
    result: Snapshot = {}
    for name in names:
        if name.startswith("system."):
            continue
        result[name] = [doc async for doc in database[name].find({})]
    return result


async def copy_database(source: Any, target: Any) -> None:
    """Copy every document and secondary index (unique, sparse) of ``source`` into ``target``."""
    for name in await source.list_collection_names():
        if name.startswith("system."):
            continue
        docs = [doc async for doc in source[name].find({})]
        for index, info in (await source[name].index_information()).items():
            if index == "_id_":
                continue
            options = {k: info[k] for k in ("unique", "sparse") if info.get(k)}
            await target[name].create_index(list(info["key"]), name=index, **options)
        if docs:
            await target[name].insert_many(docs)


def canonical(value: Any, *, ordered_arrays: bool = False) -> Any:
    """A hashable form of a BSON value in which equal documents are equal (see module doc)."""
    if isinstance(value, Mapping):
        return (
            "d",
            tuple(
                sorted(
                    (str(k), canonical(v, ordered_arrays=ordered_arrays)) for k, v in value.items()
                )
            ),
        )
    if isinstance(value, list | tuple):
        items = [canonical(v, ordered_arrays=ordered_arrays) for v in value]
        if not ordered_arrays:
            items.sort(key=repr)
        return ("l", tuple(items))
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int | float):
        number = float(value)
        return ("n", int(number) if number.is_integer() and abs(number) < 2**53 else number)
    if isinstance(value, datetime):
        when = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return ("t", (when - _EPOCH) // _MILLISECOND)
    if value is None:
        return ("z",)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, bytes):
        return ("y", value)
    return ("o", type(value).__name__, str(value))


@dataclass(frozen=True, slots=True)
class Difference:
    """The first document two databases disagree on."""

    collection: str
    document_id: Any
    #: The document in the reference database and in the one checked (None: absent).
    expected: dict[str, Any] | None
    actual: dict[str, Any] | None
    #: The first field that differs (``a.b`` for a nested one); None when a side is absent.
    field: str | None

    def describe(self, expected_as: str = "expected", actual_as: str = "here") -> str:
        """Two lines: which document; which field, with both values."""
        head = f"first differing document: {self.collection} {{_id: {self.document_id!r}}}"
        if self.expected is None:
            return f"{head}\n  absent {expected_as}; {actual_as}: {_shown.repr(self.actual)}"
        if self.actual is None:
            return f"{head}\n  {expected_as}: {_shown.repr(self.expected)}; absent {actual_as}"
        path = self.field or ""
        before = _shown.repr(field_value(self.expected, path))
        after = _shown.repr(field_value(self.actual, path))
        return f"{head}\n  field {path!r}: {before} {expected_as}; {after} {actual_as}"


def field_value(doc: Any, path: str) -> Any:
    """The value at dotted ``path`` in ``doc`` (the document itself for ""); None if absent."""
    value = doc
    for part in path.split(".") if path else ():
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _without(doc: dict[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """``doc`` without the (possibly dotted) fields ``paths``."""
    result = dict(doc)
    for path in paths:
        head, _, rest = path.partition(".")
        if head not in result:
            continue
        if rest and isinstance(result[head], dict):
            result[head] = _without(result[head], [rest])
        elif not rest:
            del result[head]
    return result


def _ignored(ignore: Iterable[str]) -> dict[str, list[str]]:
    """``"calls.updated_at"`` -> {"calls": ["updated_at"]}; ``"*.x"`` is any collection."""
    result: dict[str, list[str]] = {}
    for entry in ignore:
        collection, _, path = entry.partition(".")
        if not path:
            raise ValueError(f"ignore {entry!r}: give collection.field (or *.field)")
        result.setdefault(collection, []).append(path)
    return result


def _first_field(expected: Any, actual: Any, ordered_arrays: bool, prefix: str = "") -> str:
    """The first (sorted) field path at which two differing documents differ."""
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        for key in sorted(set(expected) | set(actual), key=str):
            left, right = expected.get(key), actual.get(key)
            if (key in expected) != (key in actual) or canonical(
                left, ordered_arrays=ordered_arrays
            ) != canonical(right, ordered_arrays=ordered_arrays):
                return _first_field(left, right, ordered_arrays, f"{prefix}{key}.")
    return prefix.rstrip(".")


def first_difference(
    expected: Snapshot,
    actual: Snapshot,
    *,
    ordered_arrays: bool = False,
    ignore: Iterable[str] = (),
) -> Difference | None:
    """The first document (collections by name, documents by ``_id``) that differs; None if none.

    ``ignore``: fields left out of the comparison, as ``collection.field`` (dotted
    for nested fields; ``*.field`` in every collection). An empty collection is
    the same as none.
    """
    skipped = _ignored(ignore)
    for name in sorted(set(expected) | set(actual)):
        paths = skipped.get(name, []) + skipped.get("*", [])
        left = _by_id(expected.get(name, []), paths, ordered_arrays)
        right = _by_id(actual.get(name, []), paths, ordered_arrays)
        if left.keys() == right.keys() and all(left[k][0] == right[k][0] for k in left):
            continue
        for key in sorted(left.keys() | right.keys(), key=repr):
            mine, theirs = left.get(key), right.get(key)
            if mine is not None and theirs is not None and mine[0] == theirs[0]:
                continue
            doc_id = (mine or theirs or (None, {}))[1].get("_id")
            if mine is None or theirs is None:
                return Difference(name, doc_id, mine and mine[1], theirs and theirs[1], field=None)
            field = _first_field(mine[1], theirs[1], ordered_arrays)
            return Difference(name, doc_id, mine[1], theirs[1], field=field or None)
    return None


def _by_id(
    docs: list[dict[str, Any]], paths: list[str], ordered_arrays: bool
) -> dict[Any, tuple[Any, dict[str, Any]]]:
    """canonical _id -> (canonical document, document), fields in ``paths`` left out."""
    result = {}
    for doc in docs:
        shown = _without(doc, paths) if paths else doc
        result[canonical(doc.get("_id"))] = (canonical(shown, ordered_arrays=ordered_arrays), shown)
    return result

"""The in-memory database handlers get in the harness: mongomock-motor, no server.

Handlers write with ``_id`` in their filters (``update_one({"_id": linkedid},
...)``), and the checks run every event several times, so an ``_id`` lookup
must not cost a scan of the collection, as it does in mongomock (every
document is matched against the filter). :func:`memory_database` therefore
teaches mongomock's collections, once, to find the document of a plain
``_id`` (a string, an integer or an ObjectId) in the store it keeps by
``_id``, then to match the whole filter against that one document: the same
documents as the scan finds, without the scan. Other filters scan, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

__all__ = ["INSTALL_HINT", "memory_database"]

INSTALL_HINT: Final = "pip install 'amiworker[testing]'"

_patched = False
_patch_lock = threading.Lock()


def memory_database(name: str = "amiworker") -> Any:
    """A new, empty in-memory database, its dates timezone-aware as the workers' are.

    Raises ImportError saying what to install when mongomock-motor is missing.
    """
    try:
        from mongomock_motor import AsyncMongoMockClient
    except ImportError as exc:
        raise ImportError(
            f"amiworker.testing needs mongomock-motor for its in-memory database: {INSTALL_HINT}"
        ) from exc
    _find_by_id_without_a_scan()
    return AsyncMongoMockClient(tz_aware=True)[name]


def _find_by_id_without_a_scan() -> None:
    global _patched
    with _patch_lock:
        if _patched:
            return
        _patched = True
        from bson import ObjectId
        from mongomock import filtering
        from mongomock.collection import Collection

        filter_applies: Callable[[Any, Any], bool] = filtering.filter_applies

        scan: Callable[[Any, Any], Iterator[dict[str, Any]]] | None = getattr(
            Collection, "_iter_documents", None
        )
        if scan is None:  # another mongomock: leave it as it is
            return

        def iter_documents(self: Any, filter: Any) -> Iterator[dict[str, Any]]:
            wanted = filter.get("_id") if isinstance(filter, dict) else None
            # Only ids whose Python equality is MongoDB's: not bools (True == 1),
            # floats, dates or documents.
            if (
                isinstance(wanted, str | ObjectId)
                or (isinstance(wanted, int) and not isinstance(wanted, bool))
            ) and type(wanted).__eq__ in (str.__eq__, int.__eq__, ObjectId.__eq__):
                store = self._store
                if wanted in store:
                    document = store[wanted]
                    return iter([document] if filter_applies(filter, document) else [])
                filter_applies(filter, {})  # a bad filter still raises, as the scan does
                return iter(())
            return scan(self, filter)

        Collection._iter_documents = iter_documents  # type: ignore[method-assign]

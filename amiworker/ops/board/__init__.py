"""The call board: ``amiworker board``, a live web page over the event log.

One concept per module: ``calls`` folds channel events into calls in progress
and calls just ended, ``rates`` counts events per second per PBX, ``queries``
reads the log and the ``workers`` collection for them, ``live`` follows the
log and pushes what changed, ``app`` is the ASGI application (JSON API, SSE,
the static page), ``command`` is the ``amiworker board`` subcommand.

Importing this package imports nothing else: Starlette and uvicorn (the
``board`` extra) are needed by ``app`` and ``command`` only.
"""

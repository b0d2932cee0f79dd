"""Handler modules of this deployment (``AMIWORKER_HANDLERS=handlers`` by default).

The package re-exports the example ``calls`` projection so that the default
settings run it. Add your own modules next to it and either list them
(``AMIWORKER_HANDLERS=handlers,handlers.billing``) or import their handlers
here. A function imported in two listed modules still runs once per event.
"""

from handlers.calls import HangupHandler, NewchannelHandler, NewstateHandler

__all__ = ["HangupHandler", "NewchannelHandler", "NewstateHandler"]

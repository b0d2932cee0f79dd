"""amiworker: Asterisk Manager Interface events into a durable MongoDB log.

Every worker process holds an AMI session to every PBX; for each channel event
the workers race to insert it into a uniquely keyed MongoDB collection and only
the winner runs the user's ``<Event>Handler``.
"""

__version__ = "0.1.0"

"""The simulated PBX: real AMI on a socket, with the events of real Asterisk 22 calls.

:class:`~amiworker.sim.pbx.FakePBX` in process, ``python -m amiworker.sim`` (or
``amiworker simulate``) as a process. The PBX of the tests, the demo and the
benchmarks; never imported by the product itself.
"""

"""The cluster testbed shared by the demo, the end-to-end tests and the benchmarks.

``fakesvc``: a fake SSL VPN service (core + HTTP listener + init-script stand-in);
``cluster``: namespaces, HAProxy, servers and agents (``Cluster``); ``load``: a bounded client load.
"""

__all__ = ["cluster", "fakesvc", "load"]

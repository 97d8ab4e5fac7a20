"""Kernel event sources: each turns one facility's events into ``watcher.core.triggers.Trigger`` values.

Every source has the same shape: ``__init__(..., emit, log)``, ``attach(loop)`` registers its
file descriptor with ``loop.add_reader`` (no threads, no polling), ``close()`` is idempotent.

* ``inotify.PidFileWatch``: the PID file's directory (HINT).
* ``pidfd.ProcessWatch``: exit of the tracked process (DEATH).
* ``proc_connector.ProcConnectorSource``: exec (HINT) and exit (DEATH) of a tgid, initial
  network namespace only.
* ``sock_diag.ListenerWatch``: destruction of the TCP listener (DEATH); ``sock_diag`` also
  dumps the listeners on a port.

The modules import neither each other nor ``rules``; this package imports none of them, so
importing one source does not load the libraries of the others.
"""

__all__: list[str] = []

"""sslvpn-heartbeat: event-driven failover agent for SSL VPN servers behind a round-robin gateway."""

__all__ = ["__version__"]

__version__ = "0.1.0"

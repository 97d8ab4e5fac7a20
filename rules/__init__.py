"""rules: the firewall chain the agent owns, built pure, applied as one transaction, read back.

This package never imports ``watcher``.
"""

__all__: list[str] = []

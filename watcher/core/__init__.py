"""The pure control core: decisions, the triggers it reads, the event catalogue."""

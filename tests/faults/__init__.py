"""Fault injection against the real daemon in throwaway network namespaces (issue 6)."""

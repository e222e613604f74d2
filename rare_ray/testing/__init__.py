"""Helpers for tests and local development (no network, no model hub)."""

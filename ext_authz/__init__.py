"""Envoy external-authorization sidecar that validates OAuth 2.0 bearer tokens."""

__version__ = "0.1.0"

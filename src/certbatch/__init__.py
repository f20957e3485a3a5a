"""certbatch: renew TLS certificates over ACME in parallel, stage them, apply them in one batch."""

__version__ = "0.1.0"

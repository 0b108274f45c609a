"""runtools-gateway: the SSH door to runtools sandboxes."""

__version__ = "0.1.0"

"""The bessgw daemon: configuration, control, supervision, service and commissioning CLI."""

__version__ = "0.1.0"

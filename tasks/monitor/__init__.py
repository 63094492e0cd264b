"""Signals from production: the service's feedback log, read for the `monitor` flow."""

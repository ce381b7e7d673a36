"""Corral's services: one package each, every one the same shape.

    handlers.py  the logic: plain async functions over contracts, no NATS
    service.py   run(): connect, declare, wire handlers to consumers, wait for stop
    errors.py    the failures a caller may handle, one type each

Beside them, cli/ is the `corral` command, one module per command group; no service imports it.
"""

"""Backends every front end talks to (one protocol, base.py): the local engine and a remote one, with caches."""

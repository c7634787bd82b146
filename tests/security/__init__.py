"""Hostile and careless inputs: no code runs untrusted, no user file is lost, no traceback (issue 19)."""

"""Changing the host: the claim transaction with its journal (run time) and boot-time hiding."""

"""Mutation testing of the safety-critical modules (``make mutation``)."""

"""Adapter deltas on the operator side: verification happens in edgetune_api.delta; aggregation here."""

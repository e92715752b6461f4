"""The only modules that do I/O: one per external system."""

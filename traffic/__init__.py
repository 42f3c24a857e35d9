"""Load generators that run inside the emulated hosts' namespaces."""

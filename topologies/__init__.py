"""Cluster shapes as pure data: from a real DualPath cluster to an emulated NetSpec."""

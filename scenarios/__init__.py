"""The composition root: scenario schema, plans, runs, results, the dpemu CLI."""

"""Linux mechanics: namespaces, links, HTB plans, processes, samplers, cleanup, fidelity."""

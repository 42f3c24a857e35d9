"""gRPC daemons of the serving plane (storage, prefill, decode, scheduler).

Empty until the serving plane lands; each daemon will be importable and runnable
without root, taking everything it needs on its command line.
"""

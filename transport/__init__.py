"""ZeroMQ transport: typed msgpack codec with zero-copy tensor frames, sockets, shared memory.

Import the pieces from their modules (`omni.transport.codec`, `.messages`, `.sockets`, `.shm`);
this package keeps its import free of side effects.
"""

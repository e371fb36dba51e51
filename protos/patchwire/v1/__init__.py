"""patchwire's versioned wire API: the generated protobuf and gRPC modules, nothing else.

The ``*_pb2*.py`` modules are generated from ``protos/patchwire/v1/*.proto`` by ``scripts/gen_protos.sh`` and
committed; how arrays, batches and shared memory travel in those messages is :mod:`patchwire.wire` (hand-written,
shared by the server and the client).
"""

"""patchwire's versioned wire API.

The ``*_pb2*.py`` modules are generated from ``protos/patchwire/v1/*.proto`` by ``scripts/gen_protos.sh`` and
committed; :mod:`patchwire.v1.codec` defines how arrays travel in those messages (shared by server and client).
"""

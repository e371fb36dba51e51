"""The wire layer: how patchwire's data travels in the ``patchwire.v1`` messages, shared by the server and the client
(which never import each other).

- :mod:`~patchwire.wire.tensors`: the dtype table; arrays to ``Tensor`` messages and back; announced sizes.
- :mod:`~patchwire.wire.compression`: which tensors may be compressed, and LZ4.
- :mod:`~patchwire.wire.framing`: batches and their chunk messages in a stream: the one reader and the writer.
- :mod:`~patchwire.wire.batches`: samples to ``Batch`` messages and back; the "same shape and dtype" rule.
- :mod:`~patchwire.wire.geometry`: ``ImageProperties``, the one type for image geometry.
- :mod:`~patchwire.wire.indexexpression`: pymia's ``IndexExpression`` and its wire form.
- :mod:`~patchwire.wire.definition`: pymia's keys and HDF5 locations.
- :mod:`~patchwire.wire.names`: the names both ends give the API's enums (overlap modes).
- :mod:`~patchwire.wire.shared_memory`: segments, regions and the Unix-socket protocol for same-host payloads.
- :mod:`~patchwire.wire.malloc`: glibc allocator settings for large messages, on both ends.
- :mod:`~patchwire.wire.errors`: malformed wire data (``WireError``, ``FramingError``) and values with no wire form.
"""

"""patchwire's server: serves pymia-format HDF5 datasets over gRPC.

Run it with ``patchwire serve --dataset NAME=PATH.h5``, or embed it::

    async with PatchwireServer(ServerConfig(datasets={"brains": Path("brains.h5")}, port=0)) as server:
        print(server.port)
"""

from patchwire.service._dataset_service import DatasetServicer
from patchwire.service._errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, ServiceError
from patchwire.service._limits import Limits
from patchwire.service._server import PatchwireServer, ServerConfig

__all__ = [
    "DatasetServicer",
    "FailedPrecondition",
    "InvalidArgument",
    "Limits",
    "NotFound",
    "OutOfRange",
    "PatchwireServer",
    "ServerConfig",
    "ServiceError",
]

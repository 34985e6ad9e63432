"""grpc.health.v1 for a server that drains: ``Watch`` streams end once a drain begins."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from protos.songrec.v1 import songrec_pb2 as pb2

RECOMMENDER = pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN = pb2.DESCRIPTOR.services_by_name["Admin"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health(health_aio.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 whose ``Watch`` streams end once a drain begins (after telling the
    watcher NOT_SERVING): the stock servicer keeps them open, and an open stream holds
    ``server.stop(grace)`` for the whole grace period. Otherwise the stock ``Watch``."""

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(
                        service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]

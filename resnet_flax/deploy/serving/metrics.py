"""The server's Prometheus metrics, in a registry of its own (not the process-wide default: two apps in one
process, as in the tests, count apart), and the ASGI middleware that counts every request.

- `resnet_flax_requests_total{route, method, status}`: requests answered, by route template (`unmatched`
  for paths of no route, so that a scan of random URLs adds no series) and status code.
- `resnet_flax_request_seconds{route}`: latency, from the first byte the app sees to the last it sends.
- `resnet_flax_in_flight_requests`: requests being handled now.
- `resnet_flax_batch_size`: real images in each forward pass (buckets at the padded sizes 1, 2, 4, ...).
"""

from __future__ import annotations

import time

import prometheus_client
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resnet_flax.deploy.serving import batching

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
  def __init__(self, max_batch: int):
    self.registry = prometheus_client.CollectorRegistry()
    self.requests = prometheus_client.Counter(
      'resnet_flax_requests', 'Requests answered.', ('route', 'method', 'status'), registry=self.registry
    )
    self.latency = prometheus_client.Histogram(
      'resnet_flax_request_seconds', 'Request latency.', ('route',), buckets=LATENCY_BUCKETS, registry=self.registry
    )
    self.in_flight = prometheus_client.Gauge(
      'resnet_flax_in_flight_requests', 'Requests being handled.', registry=self.registry
    )
    self.batch_size = prometheus_client.Histogram(
      'resnet_flax_batch_size',
      'Real images in each forward pass.',
      buckets=batching.batch_sizes(max_batch),
      registry=self.registry,
    )

  def exposition(self) -> bytes:
    """The text format Prometheus scrapes."""
    return prometheus_client.generate_latest(self.registry)


class MetricsMiddleware:
  """Counts each HTTP request of the app it wraps in `metrics`."""

  def __init__(self, app: ASGIApp, metrics: Metrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
    if scope['type'] != 'http':
      await self.app(scope, receive, send)
      return
    status = 500  # Where the app raises before it answers.

    async def send_with_status(message: Message) -> None:
      nonlocal status
      if message['type'] == 'http.response.start':
        status = message['status']
      await send(message)

    start = time.perf_counter()
    self.metrics.in_flight.inc()
    try:
      await self.app(scope, receive, send_with_status)
    finally:
      self.metrics.in_flight.dec()
      route = scope.get('route')  # Set by the router to the route that matched.
      template = getattr(route, 'path', 'unmatched')
      self.metrics.requests.labels(template, scope['method'], str(status)).inc()
      self.metrics.latency.labels(template).observe(time.perf_counter() - start)

"""The HTTP server (`python -m resnet_flax.serve`): each backend against `Model.predict`, every bad input refused with
its 4xx JSON while the server stays up, the API key, dynamic batching, the probes, the model card, Grad-CAM, base64
input, missing artifacts, one-line errors and SIGTERM draining.

The servers serve conftest's `exported` run (the smoke run: resnet_tiny, 10 synthetic classes, 32x32, in every
format). They run uvicorn on free loopback ports: in threads of this process, one per backend started on first use
(`servers`), or as `python -m resnet_flax.serve` subprocesses for the command line and SIGTERM. httpx talks to them.
"""

import asyncio
import base64
import dataclasses
import functools
import io
import logging
import os
import re
import shutil
import signal
import struct
import threading
import time
import zlib

import httpx
import jax
import numpy as np
import pytest
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from configs import smoke
from resnet_flax import models
from resnet_flax.deploy import export, formats
from resnet_flax.deploy.serving import backends, batching, launch, overlay, server
from resnet_flax.deploy.serving.request_images import Limits
from resnet_flax.errors import ConfigError
from resnet_flax.evaluate import inference

from helpers import free_port, start_server, wait_until_ready

LIMITS = Limits(max_body_bytes=2**20, max_images=8, max_pixels=1_000_000)
MAX_BATCH, MAX_WAIT_MS = 8, 30.0
KEY = 'test-key-7f3a9c'
PER_CLASS = 10  # The first test images of each class that each backend answers.


class ThreadServer:
  """uvicorn serving `app` on a free loopback port in a thread of this process (signals stay the test's)."""

  def __init__(self, app):
    config = uvicorn.Config(app, host='127.0.0.1', port=0, log_level='warning', access_log=False)
    self.server = uvicorn.Server(config)
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self) -> 'ThreadServer':
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      assert self.thread.is_alive() and time.monotonic() < deadline, 'uvicorn did not start'
      time.sleep(0.01)
    port = self.server.servers[0].sockets[0].getsockname()[1]
    self.url = f'http://127.0.0.1:{port}'
    return self

  def __exit__(self, *_):
    self.server.should_exit = True
    self.thread.join(30)


def settings(workdir, backend: str, api_key: str | None = None) -> server.Settings:
  return server.Settings(str(workdir), backend, MAX_BATCH, MAX_WAIT_MS, api_key, LIMITS)


@pytest.fixture(scope='module')
def servers(exported):
  """url(backend, api_key=None): the base URL of a server of the exported run, started and loaded on first use."""
  workdir, running = str(exported[0]), {}

  def url(backend: str, api_key: str | None = None) -> str:
    if (backend, api_key) not in running:
      load = functools.partial(backends.load, workdir, backend, [backend], MAX_BATCH)
      running[backend, api_key] = ThreadServer(server.create_app(settings(workdir, backend, api_key), load)).__enter__()
      wait_until_ready(running[backend, api_key].url)
    return running[backend, api_key].url

  yield url
  for thread_server in running.values():
    thread_server.__exit__()


@pytest.fixture(scope='module')
def first_per_class(exported):
  """(images, labels) of the first PER_CLASS test images of each class."""
  model = exported[2]
  split = inference.load_test_split(smoke.get_config().data, model.restored.run.info)
  chosen = np.concatenate([np.flatnonzero(split.labels == label)[:PER_CLASS] for label in np.unique(split.labels)])
  return split.images[chosen], split.labels[chosen]


def encoded(pixels: np.ndarray, image_format: str = 'PNG', **options) -> bytes:
  output = io.BytesIO()
  Image.fromarray(pixels).save(output, format=image_format, **options)
  return output.getvalue()


def upload(files: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
  """httpx's multipart files: a part named `file` for each image, as `curl -F file=@...` sends."""
  return [('file', (f'image{i}.png', content, 'image/png')) for i, content in enumerate(files)]


def probabilities(answer: dict, class_names) -> np.ndarray:
  """[N, classes] from /v1/predict's answer with top_k = every class."""
  rows = np.zeros((len(answer['predictions']), len(class_names)))
  for row, prediction in zip(rows, answer['predictions'], strict=True):
    assert len(prediction['top_k']) == len(class_names)
    for entry in prediction['top_k']:
      row[list(class_names).index(entry['class'])] = entry['probability']
  return rows


def predict(url: str, files: list[bytes], num_classes: int) -> dict:
  """/v1/predict's answer for `files`, MAX images a request, merged."""
  predictions = []
  for start in range(0, len(files), LIMITS.max_images):
    response = httpx.post(
      f'{url}/v1/predict', params={'top_k': num_classes}, files=upload(files[start : start + LIMITS.max_images])
    )
    assert response.status_code == 200, response.text
    predictions += response.json()['predictions']
  return {**response.json(), 'predictions': predictions}


# Answers.


@pytest.mark.parametrize('backend', ['jax', 'onnx', 'tflite'])
def test_a_float_backend_answers_as_model_predict(servers, exported, first_per_class, backend):
  model = exported[2]
  files = [encoded(image) for image in first_per_class[0]]
  answer = predict(servers(backend), files, len(model.class_names))
  assert (answer['backend'], answer['model'], answer['checkpoint_step']) == (backend, 'resnet_tiny', model.step)
  served, expected = probabilities(answer, model.class_names), model.predict(files)
  np.testing.assert_array_equal(served.argmax(axis=1), expected.argmax(axis=1))
  np.testing.assert_allclose(served, expected, atol=1e-5)


def test_the_int8_backend_is_its_artifact_and_agrees_with_the_float_model(servers, exported, first_per_class):
  workdir, card, model, _ = exported
  images = first_per_class[0]
  files = [encoded(image) for image in images]
  served = probabilities(predict(servers('tflite_int8'), files, len(model.class_names)), model.class_names)
  artifact = formats.load_artifact('tflite_int8', backends.artifact_path(workdir, 'tflite_int8'))
  np.testing.assert_allclose(served, artifact(images), atol=1e-6)  # PNG is lossless: the same pixels.
  agreement = np.mean(served.argmax(axis=1) == model.predict(files).argmax(axis=1))
  assert agreement >= 0.98 and card['artifacts']['tflite_int8']['top1_agreement_with_jax'] >= 0.98


def exif_rotated_jpeg(pixels: np.ndarray) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: the camera was turned; a viewer rotates it 90 degrees clockwise.
  return encoded(pixels, 'JPEG', quality=90, exif=exif.tobytes())


def test_any_size_format_and_orientation_gives_model_predicts_numbers(servers, exported):
  model = exported[2]
  rng = np.random.default_rng(0)
  noise = lambda *shape: rng.integers(0, 256, shape, np.uint8)
  files = [
    encoded(noise(37, 53, 3)),  # Odd sizes, both ways.
    encoded(noise(301, 97, 3), 'JPEG', quality=80),
    exif_rotated_jpeg(noise(40, 64, 3)),
    encoded(noise(45, 45)),  # Greyscale.
    encoded(noise(33, 70, 4)),  # RGBA: composited onto white.
    encoded(noise(64, 48, 3), 'WEBP'),
  ]
  served = probabilities(predict(servers('jax'), files, len(model.class_names)), model.class_names)
  np.testing.assert_allclose(served, model.predict(files), atol=1e-6)
  upright = exif_rotated_jpeg(noise(40, 64, 3))
  turned = Image.open(io.BytesIO(upright))
  assert turned.size == (64, 40) and model.pixels(upright).shape == (1, 32, 32, 3)


def test_images_as_base64_json_are_answered_as_files(servers, exported):
  model, images = exported[2], exported[3][:3]
  files = [encoded(image) for image in images]
  texts = [base64.b64encode(content).decode() for content in files]
  texts[1] = 'data:image/png;base64,' + texts[1]  # What a browser's FileReader makes.
  texts[2] = base64.encodebytes(files[2]).decode()  # Wrapped at 76 characters, as the base64 tool writes it.
  url = servers('onnx')
  as_json = httpx.post(f'{url}/v1/predict', params={'top_k': 10}, json={'images': texts})
  assert as_json.status_code == 200, as_json.text
  as_files = predict(url, files, len(model.class_names))
  np.testing.assert_array_equal(
    probabilities(as_json.json(), model.class_names), probabilities(as_files, model.class_names)
  )
  assert [p['image'] for p in as_json.json()['predictions']] == ['image 1', 'image 2', 'image 3']


# Bad input.


def png_header(width: int, height: int) -> bytes:
  """A PNG whose header says `width` x `height` RGB and that holds no pixels at all: only a check of the header
  can answer it with its size (decoding it fails)."""
  chunk = lambda kind, data: struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IEND', b'')


def truncated_jpeg() -> bytes:
  content = encoded(np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8), 'JPEG', quality=90)
  return content[: len(content) // 2]


def multipart_without_files() -> dict:
  body = b'--b0undary\r\nContent-Disposition: form-data; name="note"\r\n\r\nno image here\r\n--b0undary--\r\n'
  return {'content': body, 'headers': {'Content-Type': 'multipart/form-data; boundary=b0undary'}}


def streamed(content: bytes):
  """`content` sent in chunks, without a Content-Length: the body limit must count as it reads."""
  yield from (content[i : i + 65536] for i in range(0, len(content), 65536))


TINY_PNG = encoded(np.zeros((4, 4, 3), np.uint8))
OVERSIZED = os.urandom(LIMITS.max_body_bytes + 2**19)
BAD_REQUESTS = {  # id: (method, path, httpx arguments, status, what the error says)
  'not_an_image': ('POST', '/v1/predict', {'files': [('file', ('notes.txt', b'some text', 'text/plain'))]}, 400,
                   'image 1 (notes.txt) is not an image'),
  'truncated_jpeg': ('POST', '/v1/predict', {'files': upload([truncated_jpeg()])}, 400, 'truncated'),
  'an_icon': ('POST', '/v1/predict', {'files': upload([encoded(np.zeros((16, 16, 3), np.uint8), 'ICO')])}, 400,
              'image 1 (image0.png) is not an image in a format served here (JPEG, PNG'),  # ICO decodes on opening.
  'over_the_pixel_limit': ('POST', '/v1/predict', {'files': upload([png_header(2000, 1000)])}, 413,
                           '2000 x 1000 pixels, over the limit of 1,000,000 pixels'),
  'decompression_bomb': ('POST', '/v1/predict', {'files': upload([png_header(30000, 30000)])}, 413,
                         'too many pixels'),
  'body_over_the_limit': ('POST', '/v1/predict', {'files': upload([OVERSIZED])}, 413,
                          'the request body is over the limit of 1,048,576 bytes'),
  'body_over_the_limit_chunked': ('POST', '/v1/predict', {
    'content': streamed(b'{"images": ["' + base64.b64encode(OVERSIZED) + b'"]}'),
    'headers': {'Content-Type': 'application/json'}}, 413, 'over the limit of 1,048,576 bytes'),
  'too_many_images': ('POST', '/v1/predict', {'files': upload([TINY_PNG] * 9)}, 413,
                      'too many images: 9 in one request, at most 8'),
  'too_many_images_as_json': ('POST', '/v1/predict', {'json': {'images': [base64.b64encode(TINY_PNG).decode()] * 9}},
                              413, 'too many images: 9'),
  'wrong_content_type': ('POST', '/v1/predict', {'content': TINY_PNG, 'headers': {'Content-Type': 'image/png'}}, 415,
                         "unsupported Content-Type 'image/png'"),
  'no_content_type': ('POST', '/v1/predict', {}, 415, "unsupported Content-Type '(none)'"),
  'multipart_without_files': ('POST', '/v1/predict', multipart_without_files(), 400, 'the request holds no images'),
  'empty_file': ('POST', '/v1/predict', {'files': [('file', ('empty.jpg', b'', 'image/jpeg'))]}, 400,
                 'image 1 (empty.jpg) is empty'),
  'empty_image_list': ('POST', '/v1/predict', {'json': {'images': []}}, 400, 'the request holds no images'),
  'empty_json_body': ('POST', '/v1/predict', {'headers': {'Content-Type': 'application/json'}}, 400,
                      'the request holds no images'),
  'malformed_base64': ('POST', '/v1/predict', {'json': {'images': ['not*base64']}}, 400,
                       'image 1 is not valid base64'),
  'not_json': ('POST', '/v1/predict', {'content': b'{"images": [', 'headers': {'Content-Type': 'application/json'}},
               400, 'the body is not valid JSON'),
  'json_nested_too_deep': ('POST', '/v1/predict', {'content': b'[' * 100_000,
                           'headers': {'Content-Type': 'application/json'}}, 400, 'the body is not valid JSON'),
  'json_of_another_shape': ('POST', '/v1/predict', {'json': ['abc']}, 400, 'a JSON body must be {"images"'),
  'malformed_multipart': ('POST', '/v1/predict', {'content': b'x', 'headers': {'Content-Type': 'multipart/form-data'}},
                          400, 'malformed multipart body'),
  'explain_of_two_images': ('POST', '/v1/explain', {'files': upload([TINY_PNG] * 2)}, 400,
                            '/v1/explain takes one image, got 2'),
  'explain_of_an_unknown_class': ('POST', '/v1/explain?class_name=zebra', {'files': upload([TINY_PNG])}, 400,
                                  "unknown class_name 'zebra'"),
  'top_k_of_zero': ('POST', '/v1/predict?top_k=0', {'files': upload([TINY_PNG])}, 422,
                    'query.top_k: Input should be greater than or equal to 1'),
  'unknown_route': ('GET', '/v2/predict', {}, 404, 'no such route: /v2/predict'),
  'wrong_method': ('GET', '/v1/predict', {}, 405, 'GET is not allowed on /v1/predict'),
}  # fmt: skip


@pytest.mark.parametrize('case', BAD_REQUESTS)
def test_a_bad_request_gets_its_4xx_json_and_the_server_stays_up(servers, case):
  method, path, arguments, status, message = BAD_REQUESTS[case]
  url = servers('onnx')
  response = httpx.request(method, f'{url}{path}', **arguments)
  assert response.status_code == status, response.text
  assert response.headers['content-type'] == 'application/json'
  assert list(response.json()) == ['error'] and message in response.json()['error'], response.json()
  assert httpx.get(f'{url}/healthz').json() == {'status': 'alive'}
  assert httpx.post(f'{url}/v1/predict', files=upload([TINY_PNG])).status_code == 200


# The key.


def test_with_a_key_every_v1_route_wants_it_and_nothing_else_does(servers, caplog):
  caplog.set_level(logging.DEBUG)
  caplog.set_level(logging.DEBUG, logger='absl')
  url = servers('onnx', KEY)
  requests = {'/v1/predict': {'files': upload([TINY_PNG])}, '/v1/explain': {'files': upload([TINY_PNG])}}
  for path in ('/v1/predict', '/v1/explain', '/v1/model'):
    method, arguments = ('POST', requests[path]) if path in requests else ('GET', {})
    for headers in ({}, {'Authorization': 'Bearer wrong-key'}, {'Authorization': f'Basic {KEY}'}):
      refused = httpx.request(method, f'{url}{path}', headers=headers, **arguments)
      assert refused.status_code == 401, (path, headers)
      assert refused.json() == {'error': 'this server wants an API key: send Authorization: Bearer <key>'}
      assert refused.headers['www-authenticate'] == 'Bearer'
    accepted = httpx.request(method, f'{url}{path}', headers={'Authorization': f'Bearer {KEY}'}, **arguments)
    assert accepted.status_code == 200, (path, accepted.text)
  assert httpx.get(f'{url}/v1/model', headers={'Authorization': f'Bearer {KEY}'}).json()['api_key_required'] is True
  for path in ('/', '/healthz', '/readyz', '/metrics', '/docs', '/openapi.json'):
    assert httpx.get(f'{url}{path}').status_code == 200, path
  assert KEY not in caplog.text


def test_serving_beyond_loopback_without_a_key_is_loud(caplog):
  for host, key, warned in (('0.0.0.0', None, True), ('192.168.1.20', None, True), ('0.0.0.0', 'k', False)):
    caplog.clear()
    launch.warn_if_exposed(host, key)
    assert ('WITHOUT AN API KEY' in caplog.text) == warned, host
  for host in ('127.0.0.1', '::1', 'localhost', '127.0.0.2'):
    assert launch.is_loopback(host)
  assert not launch.is_loopback('example.org')


# Batching, probes, metrics.


def batch_sizes(url: str) -> tuple[float, float, float]:
  """The batch-size histogram of /metrics: (forward passes, images, passes of one image)."""
  families = {family.name: family for family in text_string_to_metric_families(httpx.get(f'{url}/metrics').text)}
  samples = {(s.name, s.labels.get('le')): s.value for s in families['resnet_flax_batch_size'].samples}
  count, total = samples['resnet_flax_batch_size_count', None], samples['resnet_flax_batch_size_sum', None]
  return count, total, samples['resnet_flax_batch_size_bucket', '1.0']


async def predict_concurrently(url: str, files: list[bytes]) -> list[int]:
  async with httpx.AsyncClient(base_url=url, timeout=30) as client:
    responses = await asyncio.gather(*(client.post('/v1/predict', files=upload([content])) for content in files))
  return [response.status_code for response in responses]


def test_concurrent_requests_share_forward_passes_that_compile_nothing(servers, exported):
  url, images = servers('jax'), exported[3][:16]
  compiled = []

  def listen(event: str, *_, **__):
    if event.startswith('/jax/core/compile'):
      compiled.append(event)

  before = batch_sizes(url)
  jax.monitoring.register_event_time_span_listener(listen)
  try:
    statuses = asyncio.run(predict_concurrently(url, [encoded(image) for image in images]))
  finally:
    jax.monitoring.unregister_event_time_span_listener(listen)
  count, total, singles = np.subtract(batch_sizes(url), before)
  assert statuses == [200] * 16
  assert total == 16 and count <= 8 and singles < count, (count, total, singles)  # Two images a pass or more.
  assert compiled == []  # Every padded batch size was compiled at start-up.


class RecordingModel:
  """A predict that records the batch shapes it is given, each image's probabilities its mean pixel value."""

  def __init__(self, fail: bool = False):
    self.shapes, self.fail = [], fail

  def __call__(self, images: np.ndarray) -> np.ndarray:
    self.shapes.append(images.shape)
    if self.fail:
      raise RuntimeError('the runtime failed')
    return images.reshape(len(images), -1).mean(axis=1, keepdims=True).astype(np.float32)


def run_batcher(model, sizes: list[int], max_batch: int, max_wait_ms: float, scenario) -> list[int]:
  """The sizes of the forward passes a Batcher runs for `scenario(batcher)` (a coroutine function)."""

  async def main():
    batcher = batching.Batcher(model, max_batch, max_wait_ms, sizes.append)
    try:
      return await asyncio.wait_for(scenario(batcher), 20)  # A caller left waiting fails the test.
    finally:
      await batcher.close()

  return asyncio.run(main())


def images_of(*values: int) -> np.ndarray:
  return np.stack([np.full((2, 2, 3), value, np.uint8) for value in values])


def test_the_batcher_pads_to_powers_of_two_and_answers_each_caller_its_own_rows():
  model, sizes = RecordingModel(), []

  async def scenario(batcher):
    together = await asyncio.gather(batcher.predict(images_of(1, 2, 3)), batcher.predict(images_of(4, 5)))
    return [*together, await batcher.predict(images_of(*range(6, 15)))]

  first, second, third = run_batcher(model, sizes, max_batch=8, max_wait_ms=0, scenario=scenario)
  assert first.ravel().tolist() == [1, 2, 3] and second.ravel().tolist() == [4, 5]
  assert third.ravel().tolist() == list(range(6, 15))
  assert sizes == [5, 8, 1]  # Both callers in one pass; 9 images: 8, then 1.
  assert [shape[0] for shape in model.shapes] == [8, 8, 1]  # 5 padded to 8.


def test_a_lone_request_does_not_wait_and_one_being_read_is_waited_for():
  sizes = []

  async def lone(batcher):
    start = time.perf_counter()
    await batcher.predict(images_of(1))
    return time.perf_counter() - start

  assert run_batcher(RecordingModel(), sizes, max_batch=8, max_wait_ms=5000, scenario=lone) < 1  # Not 5 s.

  async def one_arriving(batcher):
    async def slow_reader():
      with batcher.expecting():
        await asyncio.sleep(0.2)
      return await batcher.predict(images_of(2))

    reading = asyncio.create_task(slow_reader())
    await asyncio.sleep(0.05)
    return await asyncio.gather(batcher.predict(images_of(1)), reading)

  sizes.clear()
  run_batcher(RecordingModel(), sizes, max_batch=8, max_wait_ms=5000, scenario=one_arriving)
  assert sizes == [2]  # One forward pass for both.


def test_a_failed_forward_pass_fails_its_callers_only():
  model, sizes = RecordingModel(fail=True), []

  async def scenario(batcher):
    with pytest.raises(RuntimeError, match='the runtime failed'):
      await batcher.predict(images_of(1))
    model.fail = False
    return await batcher.predict(images_of(5))

  assert run_batcher(model, sizes, max_batch=4, max_wait_ms=0, scenario=scenario).ravel().tolist() == [5]


def fake_served() -> backends.Served:
  facts = backends.ModelFacts('fake', ('a', 'b'), (8, 8), 'squash', 7)
  return backends.Served('fake', backends.Backend(lambda images: np.full((len(images), 2), 0.5, np.float32), facts), {})


def test_healthz_answers_while_the_model_loads_and_readyz_once_it_is_warm():
  release = threading.Event()

  def load():
    assert release.wait(30)
    return fake_served()

  with ThreadServer(server.create_app(server.Settings('unused'), load)) as running:
    assert httpx.get(f'{running.url}/healthz').json() == {'status': 'alive'}
    loading = httpx.get(f'{running.url}/readyz')
    assert (loading.status_code, loading.json()) == (503, {'error': 'the model is loading'})
    not_yet = httpx.post(f'{running.url}/v1/predict', files=upload([TINY_PNG]))
    assert not_yet.status_code == 503 and 'still loading' in not_yet.json()['error']
    release.set()
    wait_until_ready(running.url, timeout_s=10)
    assert httpx.get(f'{running.url}/readyz').json() == {'status': 'ready', 'backend': 'fake'}
    answer = httpx.post(f'{running.url}/v1/predict', files=upload([TINY_PNG])).json()
    assert answer['predictions'][0]['top_k'] == [{'class': 'a', 'probability': 0.5}, {'class': 'b', 'probability': 0.5}]


def test_a_model_that_fails_to_load_stops_the_server_with_its_message():
  stopped = threading.Event()

  def load():
    raise ConfigError('runs/x holds no checkpoints')

  with ThreadServer(server.create_app(server.Settings('unused'), load, on_failure=stopped.set)) as running:
    assert stopped.wait(10)
    failed = httpx.get(f'{running.url}/readyz')
    assert (failed.status_code, failed.json()) == (
      503,
      {'error': 'the model failed to load: runs/x holds no checkpoints'},
    )


def test_a_failing_runtime_or_a_run_that_cannot_explain_answer_json_and_the_server_goes_on():
  served = fake_served()
  failing = dataclasses.replace(served.backend, predict=RecordingModel(fail=True))
  with ThreadServer(
    server.create_app(server.Settings('/nonexistent/run'), lambda: dataclasses.replace(served, backend=failing))
  ) as running:
    wait_until_ready(running.url, timeout_s=10)
    failed = httpx.post(f'{running.url}/v1/predict', files=upload([TINY_PNG]))
    assert failed.status_code == 500
    assert failed.json() == {
      'error': 'internal error (RuntimeError: the runtime failed); the server log has the traceback'
    }
    refused = httpx.post(f'{running.url}/v1/explain', files=upload([TINY_PNG]))  # No JAX model to load there.
    assert refused.status_code == 409 and 'has no checkpoint' in refused.json()['error'], refused.text
    assert httpx.get(f'{running.url}/healthz').status_code == 200


def test_metrics_count_requests_by_status_and_in_flight(servers):
  url = servers('tflite')
  httpx.post(f'{url}/v1/predict', files=upload([TINY_PNG]))
  httpx.post(f'{url}/v1/predict', content=b'x', headers={'Content-Type': 'text/plain'})
  httpx.get(f'{url}/no/such/page')
  families = {family.name: family for family in text_string_to_metric_families(httpx.get(f'{url}/metrics').text)}
  counts = {
    (s.labels['route'], s.labels['status']): s.value
    for s in families['resnet_flax_requests'].samples
    if s.name == 'resnet_flax_requests_total'
  }
  assert counts['/v1/predict', '200'] >= 1 and counts['/v1/predict', '415'] == 1 and counts['unmatched', '404'] == 1
  latency = {
    s.labels['route']: s.value for s in families['resnet_flax_request_seconds'].samples if s.name.endswith('_count')
  }
  assert latency['/v1/predict'] == counts['/v1/predict', '200'] + counts['/v1/predict', '415']
  assert [s.value for s in families['resnet_flax_in_flight_requests'].samples] == [1.0]  # The /metrics request itself.


# The model card, Grad-CAM, the page.


def test_the_model_card_says_what_serves(servers, exported):
  _, card, model, _ = exported
  answer = httpx.get(f'{servers("jax")}/v1/model').json()
  assert answer['class_names'] == list(model.class_names) and answer['image_size'] == [32, 32]
  assert answer['checkpoint_step'] == model.step and answer['backend'] == 'jax' and answer['model'] == 'resnet_tiny'
  assert answer['parameters'] == models.count_params(model.restored.variables['params'])
  assert answer['resize_policy'] == model.resize_policy and answer['artifacts'] == card['artifacts']
  assert answer['serving'] == {'max_batch': 8, 'max_wait_ms': 30.0, 'max_body_bytes': 2**20, 'max_images': 8,
                               'max_pixels': 1_000_000}  # fmt: skip
  assert answer['api_key_required'] is False and answer['backend_latency_ms'] == {}


def test_explain_returns_the_jax_models_grad_cam_over_the_image_whatever_the_backend(servers, exported):
  model, image = exported[2], encoded(exported[3][0])
  expected_class = int(model.predict(image).argmax())
  answers = {
    backend: httpx.post(f'{servers(backend)}/v1/explain', files=upload([image])) for backend in ('jax', 'onnx')
  }
  explanation = model.explain(image, steps=1)
  for backend, answer in answers.items():
    assert answer.status_code == 200 and answer.headers['content-type'] == 'image/png', backend
    assert int(answer.headers['x-explained-class-index']) == expected_class, backend
    assert answer.content == overlay.grad_cam_png(explanation.pixels[0], explanation.grad_cam[0]), backend
  assert Image.open(io.BytesIO(answers['onnx'].content)).size == (256, 256)
  chosen = httpx.post(f'{servers("onnx")}/v1/explain', params={'class_name': 'class_3'}, files=upload([image]))
  assert chosen.headers['x-explained-class-index'] == '3'
  of_class_3 = model.explain(image, 'class_3', steps=1)
  assert chosen.content == overlay.grad_cam_png(of_class_3.pixels[0], of_class_3.grad_cam[0]) != answers['onnx'].content


def test_the_page_and_the_schema_are_served_from_here(servers):
  url = servers('onnx')
  page = httpx.get(f'{url}/')
  assert page.status_code == 200 and page.headers['content-type'].startswith('text/html')
  for element in ('drop-zone', 'file-input', 'results', 'key-form', 'model-info', 'classes'):
    assert f'id="{element}"' in page.text, element
  assert 'http://' not in page.text and 'https://' not in page.text  # No CDN: the page works offline.
  assert not any(store in page.text for store in ('localStorage', 'sessionStorage', 'document.cookie', 'indexedDB'))
  schema = httpx.get(f'{url}/openapi.json').json()
  body = schema['paths']['/v1/predict']['post']['requestBody']['content']
  assert set(body) == {'multipart/form-data', 'application/json'}
  assert 'HTTPBearer' in schema['components']['securitySchemes']


# Artifacts, the command line, SIGTERM.


@pytest.fixture
def without_onnx(exported, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(exported[0], workdir, ignore=shutil.ignore_patterns('model.onnx'))
  return str(workdir)


def test_a_missing_artifact_names_the_command_that_makes_it(without_onnx, caplog):
  with pytest.raises(ConfigError) as error:
    backends.prepare(without_onnx, 'onnx', make_missing=False)
  assert str(error.value) == (
    f'{without_onnx}/export/model.onnx does not exist: make it with python main.py --config=<the config it was '
    f'trained with> --workdir={without_onnx} --mode=export --export_formats=jax,saved_model,tflite,tflite_int8,onnx, '
    'or serve with --export_missing'
  )
  with caplog.at_level(logging.INFO, logger='absl'):  # Converters that the export ran set absl's to WARNING.
    assert backends.prepare(without_onnx, 'auto', make_missing=False) == ['tflite', 'jax']
  assert f'auto: not considering onnx: {without_onnx}/export/model.onnx does not exist' in caplog.text


def test_export_missing_makes_the_artifact(exported, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(exported[0], workdir, ignore=shutil.ignore_patterns(export.EXPORT_DIR))
  assert backends.prepare(str(workdir), 'onnx', make_missing=True) == ['onnx']
  card = backends.read_model_card(str(workdir))
  assert list(card['artifacts']) == ['onnx'] and card['artifacts']['onnx']['top1_agreement_with_jax'] == 1.0
  assert card['command'] == backends.export_command(str(workdir), ['onnx'])
  served = backends.load(str(workdir), 'onnx', ['onnx'], max_batch=1)
  images = exported[3][:4]
  np.testing.assert_allclose(served.backend.predict(images), exported[2].predict(images), atol=1e-5)


def test_auto_serves_the_fastest_float_backend_and_says_how_fast(exported, caplog):
  with caplog.at_level(logging.INFO, logger='absl'):
    served = backends.load(str(exported[0]), 'auto', ['onnx', 'tflite', 'jax'], max_batch=2)
  latency = served.card['backend_latency_ms']
  assert set(latency) == {'onnx', 'tflite', 'jax'} and served.name == min(latency, key=latency.get)
  assert f'serving with {served.name}' in caplog.text and served.card['backend'] == served.name


def test_a_mistake_on_the_command_line_is_one_line(tmp_path):
  process = start_server(tmp_path, free_port(), '--backend=onnx')
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 1 and 'Traceback' not in output
  assert output.strip().splitlines()[-1] == (
    f'error: {tmp_path} holds no trained run (config.json and run.json are missing): train one with --mode=train '
    f'--workdir={tmp_path}, or point --workdir at a trained run'
  )


@pytest.mark.parametrize(
  'change, message',
  [
    ({'max_batch': 3}, '--max_batch=3: choose a power of two from 1 to 256'),
    ({'max_batch': 512}, '--max_batch=512: choose a power of two from 1 to 256'),
    ({'max_wait_ms': -1.0}, '--max_wait_ms=-1.0: choose 0 (no waiting) or more'),
    ({'limits': Limits(max_images=0)}, '--max_body_mb, --max_images and --max_pixels must be positive'),
    ({'api_key': 'clé'}, 'the API key must be printable ASCII without spaces: an HTTP header could not carry it'),
  ],
)
def test_settings_are_checked_before_anything_loads(change, message):
  with pytest.raises(ConfigError, match=f'^{re.escape(message)}$'):
    launch.check_settings(dataclasses.replace(server.Settings('w'), **change))
  launch.check_settings(server.Settings('w', max_batch=256, max_wait_ms=0))


def test_sigterm_answers_the_request_under_way_then_exits_0(exported):
  workdir, _, model, images = exported
  port = free_port()
  url, image = f'http://127.0.0.1:{port}', encoded(images[0])
  process = start_server(workdir, port, '--backend=onnx')
  refused_while_draining = []

  def slow_body():
    boundary = b'--b0undary'
    yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="slow.png"\r\n\r\n' + image[:100]
    time.sleep(0.3)  # The server has the request's headers: the request is under way.
    process.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # uvicorn stops listening at once, and waits for this request.
    try:
      httpx.get(f'{url}/healthz', timeout=2)
      refused_while_draining.append(False)
    except httpx.TransportError:
      refused_while_draining.append(True)
    yield image[100:] + b'\r\n' + boundary + b'--\r\n'

  try:
    wait_until_ready(url, process)
    response = httpx.post(
      f'{url}/v1/predict',
      content=slow_body(),
      headers={'Content-Type': 'multipart/form-data; boundary=b0undary'},
      timeout=30,
    )
    output, _ = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
  assert response.status_code == 200, response.text
  assert response.json()['predictions'][0]['top_k'][0]['class'] == model.predict_classes(image)[0]
  assert refused_while_draining == [True]
  assert process.returncode == 0, output
  assert 'after the requests under way were answered' in output

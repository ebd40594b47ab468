"""The HTTP API and the web page of a trained run: `create_app` builds the FastAPI app that `launch` serves.

| route | what it answers |
| --- | --- |
| `GET /` | the web page (`web/index.html`: no build step, no CDN) |
| `POST /v1/predict?top_k=5` | the top-k classes of each image (multipart files or JSON base64), the step, the model |
| `POST /v1/explain[?class_name=...]` | a PNG of the Grad-CAM map of one image over it, always from the JAX model |
| `GET /v1/model` | the model card: the export's `model_card.json` with what serves (backend, step, parameters) |
| `GET /healthz`, `GET /readyz` | alive; ready (the model loaded and warmed at every batch size) |
| `GET /metrics` | Prometheus (`metrics`) |
| `GET /docs` | the OpenAPI schema, browsable |

The model loads in a thread once the server listens, so `/healthz` answers at once and `/readyz` says
when predictions can start; a failure to load stops the server (`on_failure`). With an API key, every
`/v1/*` route wants `Authorization: Bearer <key>`, compared in constant time (`hmac.compare_digest`)
and never logged. Every error is JSON `{"error": "..."}` naming the problem: the requests' own
(`request_images.RequestError`, the body limit's 413 included), FastAPI's validation and routing (404, 405), what
the run cannot do (a `UserError`: 409) and a failure of the server (500, its traceback logged).
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import importlib.resources
import threading
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import numpy as np
from absl import logging
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from resnet_flax.deploy import api
from resnet_flax.deploy.serving import backends, batching, metrics, overlay, request_images
from resnet_flax.deploy.serving.request_images import Limits, RequestError
from resnet_flax.errors import UserError

DECODERS = 2  # Images decoded at once (`State.decode`).
UPLOAD_BODY = {  # /v1/predict's and /v1/explain's bodies in the OpenAPI schema (the route parses them itself).
  'required': True,
  'content': {
    request_images.MULTIPART: {
      'schema': {
        'type': 'object',
        'properties': {'file': {'type': 'array', 'items': {'type': 'string', 'format': 'binary'}}},
      }
    },
    request_images.JSON: {
      'schema': {
        'type': 'object',
        'required': ['images'],
        'properties': {'images': {'type': 'array', 'items': {'type': 'string', 'format': 'byte'}}},
      }
    },
  },
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `python -m resnet_flax.serve` sets, but the address."""

  workdir: str
  backend: str = 'auto'  # auto | a name of backends.BACKENDS.
  max_batch: int = 32  # A power of two.
  max_wait_ms: float = 2.0
  api_key: str | None = None
  limits: Limits = Limits()


class State:
  """What the app holds once the model is loaded (`ready`), or why it could not be (`failure`)."""

  def __init__(self, settings: Settings):
    self.settings = settings
    self.metrics = metrics.Metrics(settings.max_batch)
    self.served: backends.Served | None = None
    self.batcher: batching.Batcher | None = None
    self.failure: str | None = None
    self._explain_model: api.Model | None = None
    self._explain_lock = threading.Lock()
    # At most DECODERS images decode at once, however many requests come: each may hold a few full-size copies of
    # an image of up to limits.max_pixels (0.2 GB apiece at 50 megapixels), so decoding's memory stays bounded.
    self._decoders = concurrent.futures.ThreadPoolExecutor(DECODERS, thread_name_prefix='decode')

  @property
  def ready(self) -> bool:
    return self.batcher is not None

  async def served_model(self) -> backends.Served:
    """What serves: a dependency of the /v1 routes, a 503 while the model loads."""
    if not self.ready:
      raise RequestError(503, 'the model is still loading: GET /readyz says when it is ready')
    return self.served

  async def read_images(self, request: Request) -> tuple[list[request_images.Upload], np.ndarray]:
    """The uploads of `request` and their pixels as the model sees them."""
    uploads = await request_images.read_uploads(request, self.settings.limits)
    return uploads, await self.decode(uploads)

  async def decode(self, uploads: list[request_images.Upload]) -> np.ndarray:
    """uint8 [N, H, W, 3] of `uploads` as the model sees them, decoded in one of the `DECODERS` threads."""
    facts, limits = self.served.backend.facts, self.settings.limits
    decode = functools.partial(request_images.decode_all, uploads, facts.image_size, facts.resize_policy, limits)
    return await asyncio.get_running_loop().run_in_executor(self._decoders, decode)

  def explain_model(self) -> api.Model:
    """The JAX model of the served checkpoint, loaded on the first call (the served one where the backend is jax);
    call it in a thread."""
    with self._explain_lock:
      if self._explain_model is None:
        step = self.served.backend.facts.checkpoint_step  # The artifacts' checkpoint, as their model card says.
        self._explain_model = self.served.backend.jax_model or api.load(self.settings.workdir, step)
      return self._explain_model

  def explain_png(self, pixels: np.ndarray, class_name: str | None) -> tuple[bytes, int]:
    """The Grad-CAM overlay PNG of uint8 `pixels` [1, H, W, 3] for `class_name` (None: the predicted class),
    and the class explained. One at a time: the first call compiles."""
    model = self.explain_model()
    with self._explain_lock, np.errstate(invalid='ignore'):  # IG's completeness of a black image is 0 / 0.
      explanation = model.explain(pixels, classes=class_name, steps=1)  # Integrated gradients: one chunk, unused.
    return overlay.grad_cam_png(explanation.pixels[0], explanation.grad_cam[0]), int(explanation.classes[0])


def create_app(
  settings: Settings,
  load: Callable[[], backends.Served],
  on_failure: Callable[[], None] = lambda: None,
) -> FastAPI:
  """The app serving what `load` returns (called in a thread at start-up); `on_failure` is called when it raises."""
  state = State(settings)

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    loading = asyncio.create_task(_start(state, load, on_failure))
    yield
    await asyncio.gather(loading, return_exceptions=True)
    if state.batcher is not None:
      await state.batcher.close()

  app = FastAPI(
    title='resnet_flax',
    summary=f'Image classification by the trained run in {settings.workdir}',
    lifespan=lifespan,
  )
  app.state.serving = state
  app.add_middleware(request_images.BodyLimit, max_bytes=settings.limits.max_body_bytes)
  app.add_middleware(metrics.MetricsMiddleware, metrics=state.metrics)  # Outermost: it counts every answer.
  _add_error_handlers(app)
  _add_probes(app, state)
  app.include_router(_v1_router(state))
  return app


async def _start(state: State, load: Callable[[], backends.Served], on_failure: Callable[[], None]) -> None:
  try:
    served = await asyncio.to_thread(load)
  except UserError as e:  # Its message is its one line.
    state.failure = str(e)
  except Exception as e:  # A bug: logged whole.
    state.failure = f'{type(e).__name__}: {e}'
    logging.exception('The model failed to load')
  if state.failure is not None:
    on_failure()
    return
  state.served = served
  state.batcher = batching.Batcher(
    served.backend.predict, state.settings.max_batch, state.settings.max_wait_ms, state.metrics.batch_size.observe
  )
  logging.info('Ready: %s', served.name)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
  return JSONResponse({'error': message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
  @app.exception_handler(RequestError)
  async def request_error(request: Request, e: RequestError) -> JSONResponse:
    return error(e.status, str(e))

  @app.exception_handler(RequestValidationError)
  async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    problems = '; '.join(f'{".".join(map(str, item["loc"]))}: {item["msg"]}' for item in e.errors())
    return error(422, f'invalid request: {problems}')

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    messages = {
      404: f'no such route: {request.url.path} (GET / is the web page, GET /docs lists the API)',
      405: f'{request.method} is not allowed on {request.url.path}',
    }
    return error(e.status_code, messages.get(e.status_code, str(e.detail)), e.headers)

  @app.exception_handler(UserError)
  async def user_error(request: Request, e: UserError) -> JSONResponse:  # The run cannot do it (explain an int8 run).
    return error(409, str(e))

  @app.exception_handler(Exception)
  async def internal_error(request: Request, e: Exception) -> JSONResponse:  # Starlette logs it with its traceback.
    return error(500, f'internal error ({type(e).__name__}: {e}); the server log has the traceback')


def _add_probes(app: FastAPI, state: State) -> None:
  page = importlib.resources.files(__package__).joinpath('web', 'index.html').read_text(encoding='utf-8')

  @app.get('/', response_class=HTMLResponse, include_in_schema=False)
  async def index() -> HTMLResponse:
    return HTMLResponse(page)

  @app.get('/healthz')
  async def healthz() -> dict[str, str]:
    """Alive: the server answers (the model may still be loading)."""
    return {'status': 'alive'}

  @app.get('/readyz')
  async def readyz() -> Any:
    """Ready: the model is loaded and warmed at every batch size."""
    if state.ready:
      return {'status': 'ready', 'backend': state.served.name}
    return error(503, f'the model failed to load: {state.failure}' if state.failure else 'the model is loading')

  @app.get('/metrics', include_in_schema=False)
  async def prometheus_metrics() -> Response:
    return Response(state.metrics.exposition(), media_type='text/plain; version=0.0.4; charset=utf-8')


def _authorization(api_key: str | None) -> Callable:
  """The dependency that wants `Authorization: Bearer <api_key>` (nothing where `api_key` is None)."""
  bearer = HTTPBearer(auto_error=False, description="The server's --api_key, when it has one.")

  async def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    given = credentials.credentials if credentials else ''
    if api_key is not None and not hmac.compare_digest(given.encode(), api_key.encode()):
      raise HTTPException(
        401, 'this server wants an API key: send Authorization: Bearer <key>', {'WWW-Authenticate': 'Bearer'}
      )

  return authorized


def top_classes(
  uploads: list[request_images.Upload], probabilities: np.ndarray, class_names: Sequence[str], top_k: int
) -> list[dict[str, Any]]:
  """/v1/predict's `predictions`: each image's `top_k` classes, most probable first."""
  predictions = []
  for upload, row in zip(uploads, probabilities, strict=True):
    top = np.argsort(-row, kind='stable')[:top_k]
    predictions.append(
      {'image': upload.name, 'top_k': [{'class': class_names[i], 'probability': float(row[i])} for i in top]}
    )
  return predictions


def _v1_router(state: State) -> APIRouter:
  settings = state.settings
  ServedModel = Annotated[backends.Served, Depends(state.served_model)]  # The served model, as a route parameter.
  router = APIRouter(prefix='/v1', dependencies=[Depends(_authorization(settings.api_key))])

  @router.post('/predict', openapi_extra={'requestBody': UPLOAD_BODY})
  async def predict(
    request: Request, model: ServedModel, top_k: Annotated[int, Query(ge=1, description='Classes per image')] = 5
  ) -> dict[str, Any]:
    """The top-k classes of each image, most probable first, with the checkpoint step and the model."""
    with state.batcher.expecting():
      uploads, pixels = await state.read_images(request)
    probabilities = await state.batcher.predict(pixels)  # Queued at once: no await in between.
    facts = model.backend.facts
    return {
      'model': facts.model,
      'checkpoint_step': facts.checkpoint_step,
      'backend': model.name,
      'predictions': top_classes(uploads, probabilities, facts.class_names, top_k),
    }

  @router.post('/explain', openapi_extra={'requestBody': UPLOAD_BODY}, response_class=Response)
  async def explain(
    request: Request,
    model: ServedModel,
    class_name: Annotated[str | None, Query(description='The class to explain (default: the predicted one)')] = None,
  ) -> Response:
    """A PNG of the Grad-CAM map of one image over the pixels the model saw (the JAX model, whatever the backend)."""
    if class_name is not None and class_name not in model.backend.facts.class_names:
      raise RequestError(400, f'unknown class_name {class_name!r}: GET /v1/model lists the classes')
    uploads = await request_images.read_uploads(request, settings.limits)
    if len(uploads) != 1:  # Before decoding any.
      raise RequestError(400, f'/v1/explain takes one image, got {len(uploads)}')
    pixels = await state.decode(uploads)
    png, explained = await asyncio.to_thread(state.explain_png, pixels, class_name)
    return Response(png, media_type='image/png', headers={'X-Explained-Class-Index': str(explained)})

  @router.get('/model')
  async def model_card(model: ServedModel) -> dict[str, Any]:
    """The export's model card where there is one, with what serves: backend, step, classes, parameters."""
    serving = {
      'max_batch': settings.max_batch,
      'max_wait_ms': settings.max_wait_ms,
      **dataclasses.asdict(settings.limits),
    }
    return {**model.card, 'serving': serving, 'api_key_required': settings.api_key is not None}

  return router

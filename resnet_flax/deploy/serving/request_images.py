"""What a request may send, and its images as the model sees them: each limit checked before the work it guards.

Images come as multipart file parts (`curl -F file=@cat.jpg`, any field name, several parts for several
images) or as JSON `{"images": ["<base64 of an image file>", ...]}` (a `data:` URL prefix is accepted).
The body's size is capped by `BodyLimit`: by its Content-Length before anything is read, else while it is
read (a chunked body); the number of images is checked before any is decoded, and each
image's pixel count is read from its header (Pillow's `Image.open` reads only the header) before it is
decoded: a decompression bomb is refused without allocating its pixels. Decoding is `images.load_image`,
which `Model.predict`, training and evaluation call with the run's recorded size and resize policy: the
same pixels whatever the entry point. A truncated file fails in the decoder (`Image.verify()` would not
notice) and is refused naming the image. Every refusal is a `RequestError`: an HTTP status and one line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json

import numpy as np
from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resnet_flax.data import DataError, images

MULTIPART, JSON = 'multipart/form-data', 'application/json'
HOW_TO_SEND = (
  'send images as multipart/form-data file parts (curl -F file=@cat.jpg) or as JSON {"images": [base64, ...]}'
)


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may hold."""

  max_body_bytes: int = 64 * 2**20
  max_images: int = 64
  max_pixels: int = 50_000_000  # Per image, e.g. 8660 x 5773; Pillow refuses 2 x 89.5 megapixels itself.


class RequestError(Exception):
  """A request the server refuses: its HTTP status (4xx) and the one line that says what is wrong."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class BodyLimit:
  """ASGI middleware refusing a request body over `max_bytes` with a 413: at once where its Content-Length says
  so (nothing is read: curl, which waits for `100 Continue` before a large body, sends none of it), else as soon
  as the bytes read pass the limit. (Starlette's limit answers in plain text; errors here are JSON.)"""

  def __init__(self, app: ASGIApp, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes
    self.message = f'the request body is over the limit of {max_bytes:,} bytes'

  async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
    if scope['type'] != 'http':
      await self.app(scope, receive, send)
      return
    declared = Headers(scope=scope).get('content-length', '')
    if declared.isdigit() and int(declared) > self.max_bytes:
      await JSONResponse({'error': self.message}, status_code=413)(scope, receive, send)
      return
    received = 0

    async def counted() -> Message:
      nonlocal received
      message = await receive()
      received += len(message.get('body', b''))
      if received > self.max_bytes:
        raise RequestError(413, self.message)
      return message

    await self.app(scope, counted, send)


@dataclasses.dataclass(frozen=True)
class Upload:
  name: str  # How errors name the image: its file name, or its place in the request.
  content: bytes  # The encoded file.


async def read_uploads(request: Request, limits: Limits) -> list[Upload]:
  """The encoded images of a request, at least one and at most `limits.max_images`."""
  media_type = request.headers.get('content-type', '').split(';')[0].strip().lower()
  if media_type == MULTIPART:
    uploads = await _multipart_uploads(request, limits)
  elif media_type == JSON:
    uploads = await asyncio.to_thread(_json_uploads, await request.body(), limits)  # Up to the body limit: long.
  else:
    raise RequestError(415, f'unsupported Content-Type {media_type or "(none)"!r}: {HOW_TO_SEND}')
  if not uploads:
    raise RequestError(400, f'the request holds no images: {HOW_TO_SEND}')
  return uploads


def _check_count(count: int, limits: Limits) -> None:
  if count > limits.max_images:
    raise RequestError(413, f'too many images: {count} in one request, at most {limits.max_images}')


async def _multipart_uploads(request: Request, limits: Limits) -> list[Upload]:
  try:
    async with request.form() as form:
      files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
      _check_count(len(files), limits)
      return [Upload(f'image {i + 1} ({file.filename})', await file.read()) for i, file in enumerate(files)]
  except HTTPException as e:  # Starlette's, for a malformed body.
    raise RequestError(e.status_code, f'malformed multipart body: {e.detail}') from e


def _json_uploads(body: bytes, limits: Limits) -> list[Upload]:
  if not body.strip():
    return []
  try:
    document = json.loads(body)
  except (ValueError, RecursionError) as e:  # RecursionError: nested too deep.
    raise RequestError(400, f'the body is not valid JSON ({e})') from e
  texts = document.get('images') if isinstance(document, dict) else None
  if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
    raise RequestError(400, 'a JSON body must be {"images": ["<base64 of an image file>", ...]}')
  _check_count(len(texts), limits)
  return [Upload(f'image {i + 1}', _from_base64(f'image {i + 1}', text)) for i, text in enumerate(texts)]


def _from_base64(name: str, text: str) -> bytes:
  if text.startswith('data:'):  # A data URL, as a browser's FileReader makes: data:image/png;base64,....
    text = text.partition(',')[2]
  try:
    return base64.b64decode(''.join(text.split()), validate=True)
  except binascii.Error as e:
    raise RequestError(400, f'{name} is not valid base64 ({e})') from e


def decode(upload: Upload, size: tuple[int, int], policy: str, limits: Limits) -> np.ndarray:
  """uint8 [H, W, 3]: the image of `upload` resized to `size` (height, width) by `policy`, as `Model.predict`
  does; its pixel count checked from its header first."""
  if not upload.content:
    raise RequestError(400, f'{upload.name} is empty')
  try:
    with Image.open(io.BytesIO(upload.content), formats=images.IMAGE_FORMATS) as image:
      width, height = image.size
  except Image.DecompressionBombError as e:
    raise RequestError(413, f'{upload.name} has too many pixels ({e})') from e
  except Image.UnidentifiedImageError as e:
    formats = ', '.join(images.IMAGE_FORMATS)
    raise RequestError(400, f'{upload.name} is not an image in a format served here ({formats})') from e
  except (OSError, SyntaxError, ValueError, RecursionError) as e:  # SyntaxError: a broken PNG header.
    raise RequestError(400, f'{upload.name} is not a readable image ({e})') from e
  if width * height > limits.max_pixels:
    raise RequestError(
      413, f'{upload.name} is {width} x {height} pixels, over the limit of {limits.max_pixels:,} pixels an image'
    )
  try:
    return images.load_image(upload.content, size, policy)
  except DataError as e:  # Truncated or corrupt past its header.
    raise RequestError(400, f'{upload.name} cannot be decoded ({e.__cause__ or e})') from e


def decode_all(uploads: list[Upload], size: tuple[int, int], policy: str, limits: Limits) -> np.ndarray:
  """uint8 [N, H, W, 3] of every upload (`decode`)."""
  return np.stack([decode(upload, size, policy, limits) for upload in uploads])

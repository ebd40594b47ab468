"""Serving a trained run over HTTP (`python -m resnet_flax.serve`; docs/serving.md): FastAPI on uvicorn.

- `backends`: the runtimes (JAX, ONNX Runtime, LiteRT float and int8) as one `predict`, and `auto`'s choice.
- `batching`: concurrent requests' images gathered into one padded forward pass, in a worker thread.
- `request_images`: what a request may send (its limits) and its images decoded as `Model.predict` decodes them.
- `metrics`: Prometheus counters and histograms, in the app's own registry.
- `overlay`: `/v1/explain`'s Grad-CAM PNG.
- `server`: the app (`create_app`): routes, the API key, errors as JSON, the web page (`web/index.html`).
- `launch`: checks, uvicorn, the graceful exit on SIGTERM.
"""

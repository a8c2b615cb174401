"""`opencamp serve`: an OpenAI-compatible HTTP server with a web chat page.

    from opencamp.server import ServerOptions, create_app
    app = create_app(lambda: opencamp.LLM("path/to/model"), ServerOptions(model_name="smollm2"))
    # then run `app` with any ASGI server, e.g. uvicorn.run(app)

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus), GET / (the chat page).
"""
from .app import DEFAULT_SAMPLING, ServerOptions, create_app
from .protocol import APIError

__all__ = ["create_app", "ServerOptions", "DEFAULT_SAMPLING", "APIError"]

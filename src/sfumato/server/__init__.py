"""HTTP service: A1111- and OpenAI-compatible image APIs and a web page over one loaded model.

`python -m sfumato.server --model DIR` (or `sfumato serve`); `create_app(pipe)` for an ASGI app of your own.
fastapi and uvicorn come with the `serve` extra (`pip install 'sfumato[serve]'`), so this package imports
them only when a server is built.
"""

from sfumato.server.main import add_serve_arguments, main, serve_main


def create_app(*args, **kwargs):
    """See `sfumato.server.app.create_app`."""
    from sfumato.server.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["add_serve_arguments", "create_app", "main", "serve_main"]

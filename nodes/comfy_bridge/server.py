"""ComfyUI's web server: the pack's JSON routes (``/stepvideo/...``, also served under ``/api``).

Inside ComfyUI routes go on the running ``PromptServer``. Outside ComfyUI (tests, scripts), or
in a ComfyUI without a server, :func:`add_route` registers nothing and says so (False).
"""

from __future__ import annotations

import asyncio
import logging

from .modules import _already_imported

log = logging.getLogger("StepVideo")

_ROUTES: set = set()  # (METHOD, path) registered on the server so far


def _prompt_server():
    """Return ComfyUI's running ``PromptServer`` instance, or None (plain Python, or a ComfyUI without a server).

    Only an already-imported ``server`` module counts: importing it ourselves would start
    ComfyUI's machinery.
    """
    prompt_server = getattr(_already_imported("server"), "PromptServer", None)
    return getattr(prompt_server, "instance", None)


def add_route(method: str, path: str, handler) -> bool:
    """Serve ``handler`` at ``path`` on ComfyUI's web server; returns True when registered.

    ``handler(query: dict[str, str]) -> (status: int, body: dict)`` is a plain function (run
    in a worker thread, so it may read files); the answer goes out as JSON. ComfyUI also
    serves every route under ``/api``, which is where the frontend's ``api.fetchApi`` asks.
    Outside ComfyUI (tests, scripts) nothing happens and False is returned; registering the
    same method and path twice is a no-op.
    """
    key = (method.upper(), path)
    server = _prompt_server()
    if server is None or key in _ROUTES:
        return False

    async def serve(request):
        from aiohttp import web  # ComfyUI's own web framework; present wherever a PromptServer runs

        loop = asyncio.get_running_loop()
        try:
            status, body = await loop.run_in_executor(None, handler, dict(request.rel_url.query))
        except Exception as exc:  # noqa: BLE001 - answer with the reason instead of a bare 500 page
            log.exception("StepVideo: %s %s failed", method, path)
            status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
        return web.json_response(body, status=status)

    server.routes.route(method.upper(), path)(serve)
    _ROUTES.add(key)
    return True

"""Mount the dashboard (any WSGI app) in a Django URLconf::

    from django.urls import include, path
    from mongo_events.contrib.django.dashboard import dashboard_urls

    urlpatterns = [path("ops/events/", include(dashboard_urls(dashboard_app)))]

Django's own authentication applies when you wrap the view (``view_wrapper=login_required``
or ``staff_member_required``). Django's CSRF middleware is bypassed for these views: the
dashboard checks its own CSRF token on every write.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["dashboard_urls"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def dashboard_urls(app: WSGIApp, view_wrapper: Callable[[Any], Any] | None = None) -> list[Any]:
    """URL patterns serving ``app`` (usually :func:`mongo_events.monitor.wsgi_app`) under
    wherever they are included.

    :param app: the WSGI application.
    :param view_wrapper: a decorator for the view, e.g. ``staff_member_required``.

    .. versionadded:: 0.1.0
    """
    from django.http import HttpRequest, HttpResponse
    from django.urls import re_path
    from django.views.decorators.csrf import csrf_exempt

    def view(request: HttpRequest, path: str = "") -> HttpResponse:
        environ = dict(request.META)
        mount = request.path[: len(request.path) - len(path)] if path else request.path
        environ["SCRIPT_NAME"] = mount.rstrip("/")
        environ["PATH_INFO"] = "/" + path
        environ["wsgi.input"] = io.BytesIO(request.body)
        environ.setdefault("wsgi.url_scheme", request.scheme)
        captured: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured["status"], captured["headers"] = status, headers

        body = b"".join(app(environ, start_response))
        response = HttpResponse(body, status=int(captured["status"].split()[0]))
        for name, value in captured["headers"]:
            if name.lower() == "set-cookie":
                response.cookies.load(value)  # Django writes its cookies itself
            elif name.lower() != "content-length":
                response[name] = value
        return response

    wrapped = csrf_exempt(view)
    if view_wrapper is not None:
        wrapped = view_wrapper(wrapped)
    return [re_path(r"^(?P<path>.*)$", wrapped)]

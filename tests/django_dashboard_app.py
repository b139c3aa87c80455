"""A Django project in one module, for tests/test_dashboard.py (run in its own process:
Django's settings can be configured once per process)."""

from __future__ import annotations

import re
import sys

import django
from django.conf import settings

import mongo_events as me
from mongo_events.monitor import MemoryMonitorStore, wsgi_app

settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["testserver"],
    DATABASES={},
    SECRET_KEY="x",
    MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
)
django.setup()

from django.test import Client  # noqa: E402
from django.urls import include, path  # noqa: E402

from mongo_events.contrib.django.dashboard import dashboard_urls  # noqa: E402

FORM = "application/x-www-form-urlencoded"  # what a browser sends for the dashboard's forms
letters = me.MemoryDeadLetterStore()
urlpatterns = [
    path("ops/events/", include(dashboard_urls(wsgi_app(MemoryMonitorStore(), dead_letters=letters))))
]

if __name__ == "__main__":
    from datetime import datetime, timezone

    from mongo_events.stores.records import DeadLetter

    letters.store(
        DeadLetter(
            "d1", "orders", "82aa", {"_id": 1}, {}, "ValueError: x", 0, "orders", datetime.now(timezone.utc)
        )
    )
    c = Client()
    page = c.get("/ops/events/dead-letters")
    assert page.status_code == 200 and b'href="/ops/events/dead-letters/d1/delete"' in page.content, (
        page.content
    )
    confirm = c.get("/ops/events/dead-letters/d1/delete").content.decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', confirm)
    assert token, confirm
    assert (
        c.post("/ops/events/dead-letters/d1/delete", "csrf_token=forged", content_type=FORM).status_code
        == 403
    )
    done = c.post("/ops/events/dead-letters/d1/delete", f"csrf_token={token.group(1)}", content_type=FORM)
    assert done.status_code == 303 and done["Location"] == "/ops/events/dead-letters?done=deleted", done
    assert letters.count() == 0
    assert c.get("/ops/events/v1/dead-letters/count").json() == {"count": 0}
    print("django ok")
    sys.exit(0)

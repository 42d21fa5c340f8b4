"""A Django project in one file behind keystile: DRF views with scopes and a plain view.

From the repository root, either::

    python examples/django_app.py                # mints a demo key on the first run
    uvicorn examples.django_app:application      # serves keys made with the keystile CLI

then ``curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/whoami``. The database
is ``KEYSTILE_DATABASE_URL``, else ``sqlite:///keystile.db``, the ``keystile`` CLI's default,
so keys made with ``keystile create`` work here. A real project keeps the settings in
``settings.py`` and the last line in ``asgi.py``.
"""

from __future__ import annotations

import os

import django
from django.conf import settings

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "sqlite:///keystile.db")

settings.configure(
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "insecure-example-only"),
    ALLOWED_HOSTS=["localhost", "127.0.0.1"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "rest_framework"],
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        # request.user is the key in plain Django views too
        "keystile.django.KeystileUserMiddleware",
    ],
    REST_FRAMEWORK={
        "DEFAULT_AUTHENTICATION_CLASSES": ["keystile.django.KeystileAuthentication"],
        "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
        "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    },
)
django.setup()

# Below, everything needs the settings above: Django's one-file layout.
from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from rest_framework.decorators import api_view, permission_classes  # noqa: E402
from rest_framework.request import Request  # noqa: E402
from rest_framework.response import Response  # noqa: E402
from rest_framework.views import APIView  # noqa: E402

from keystile.django import HasScopes, protect, require_scopes  # noqa: E402


def health(request: HttpRequest) -> JsonResponse:
    """A plain Django view on an exempt path: the key if one was sent, else anonymous."""
    return JsonResponse({"status": "ok", "user": str(request.user)})


class WhoAmI(APIView):
    def get(self, request: Request) -> Response:
        return Response({"key": request.user.display_name, "scopes": list(request.user.scopes)})


class Items(APIView):
    permission_classes = [HasScopes]
    required_scopes = ["items:read"]

    def get(self, request: Request) -> Response:
        return Response(["a", "b"])


@api_view(["POST"])
@permission_classes([require_scopes("items:write")])
def create_item(request: Request) -> Response:
    return Response({"created": True}, status=201)


urlpatterns = [
    path("health", health),
    path("whoami", WhoAmI.as_view()),
    path("items", Items.as_view()),
    path("items/new", create_item),
]

application = protect(get_asgi_application(), database_url=DATABASE_URL, exempt_paths=["/health"])


if __name__ == "__main__":
    import asyncio

    import uvicorn

    from keystile import KeyManager

    async def ensure_demo_key() -> str | None:
        async with KeyManager.from_url(DATABASE_URL) as keys:
            if any(k.name == "demo" and k.is_active() for k in await keys.list("demo")):
                return None
            created = await keys.create(owner="demo", name="demo", scopes=["items:read"])
            return created.key

    demo_key = asyncio.run(ensure_demo_key())
    if demo_key is None:
        print(f"Using the demo key printed when it was made ({DATABASE_URL}).")
    else:
        print(f"Demo key (shown once, scope items:read):\n\n    {demo_key}\n")
    uvicorn.run(application, host="127.0.0.1", port=8000)

"""Views and URLs of the tests' Django project (settings in ``django_settings``)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.http import require_POST
from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from keystile.django import HasScopes, require_scopes


class WhoAmI(APIView):
    def get(self, request: Request) -> Response:
        user = request.user
        return Response(
            {
                "type": type(user).__name__,
                "display_name": getattr(user, "display_name", None),
                "is_authenticated": user.is_authenticated,
                "pk": user.pk,
                "auth_scopes": list(request.auth.scopes) if request.auth else None,
            }
        )


class Items(APIView):
    permission_classes = [IsAuthenticated, HasScopes]
    required_scopes = ["items:read"]

    def get(self, request: Request) -> Response:
        return Response(["a", "b"])


class Writing(APIView):
    permission_classes = [HasScopes]
    required_scopes = ["items:write"]

    def get(self, request: Request) -> Response:
        return Response("written")


class Undeclared(APIView):
    permission_classes = [HasScopes]

    def get(self, request: Request) -> Response:
        return Response("never")


@api_view(["POST"])
@permission_classes([require_scopes("items:write")])
def create_item(request: Request) -> Response:
    return Response({"created": request.data["name"]}, status=201)


def plain(request: HttpRequest) -> JsonResponse:
    user: Any = request.user
    return JsonResponse(
        {
            "type": type(user).__name__,
            "user": str(user),
            "is_authenticated": user.is_authenticated,
            "scopes": list(getattr(user, "scopes", ())),
        }
    )


@require_POST
def plain_post(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"posted_by": str(request.user)})


urlpatterns = [
    path("drf/whoami", WhoAmI.as_view()),
    path("drf/public", WhoAmI.as_view()),
    path("drf/items", Items.as_view()),
    path("drf/undeclared", Undeclared.as_view()),
    path("drf/create", create_item),
    path("plain", plain),
    path("public", plain),
    path("plain/post", plain_post),
    # the failures every adapter must answer alike (test_error_bodies)
    path("scoped", Writing.as_view()),
    path("open/scoped", Writing.as_view()),
    path("open/me", WhoAmI.as_view()),
]

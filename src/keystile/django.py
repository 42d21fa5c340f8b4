"""Django and Django REST framework over the key ``APIKeyMiddleware`` already verified.

    # asgi.py
    from django.core.asgi import get_asgi_application
    from keystile.django import protect

    application = protect(get_asgi_application(), database_url="sqlite:///keystile.db")

    # settings.py
    MIDDLEWARE = [..., "django.contrib.auth.middleware.AuthenticationMiddleware",
                  "keystile.django.KeystileUserMiddleware"]
    REST_FRAMEWORK = {
        "DEFAULT_AUTHENTICATION_CLASSES": ["keystile.django.KeystileAuthentication"],
        "EXCEPTION_HANDLER": "keystile.django.exception_handler",
    }

    # views.py
    class Items(APIView):
        permission_classes = [HasScopes]
        required_scopes = ["items:read"]

The ASGI middleware is the only verifier. Under Django's ``ASGIHandler`` the request
keeps the ASGI scope (``request.scope``), where the middleware left ``scope["user"]``
(an :class:`~keystile.APIKeyUser`) and ``scope["auth"]`` (its scopes); everything here
reads them, so a request costs one verification whatever Django and DRF do with it.
Django and DRF expect a user with ``pk``, ``is_active``, ``has_perm`` and the rest, so
the key reaches them as a :class:`KeystileUser`, a thin adapter around the key.

Refusals are the middleware's: :class:`HasScopes` raises :class:`KeystileRefusal`, whose
status, body and challenge are those the middleware sends for the same failure, and
:func:`exception_handler` adds the rest of its headers and answers DRF's own 401 (a view
reached without a key) with keystile's body.

Without the ASGI middleware in front (a WSGI deployment, or an unwrapped
``get_asgi_application()``) these classes raise ``ImproperlyConfigured``, a 500: a
misassembled app fails closed instead of quietly treating every caller as anonymous.

Django and DRF are an optional extra: ``pip install "keystile[django]"``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, cast

from . import adapters

try:
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction
    from django.apps import apps
    from django.core.exceptions import ImproperlyConfigured
    from rest_framework.authentication import BaseAuthentication
    from rest_framework.exceptions import APIException, NotAuthenticated
    from rest_framework.permissions import BasePermission
except ImportError as exc:  # pragma: no cover - exercised by a test that hides django
    raise adapters.missing_extra("django", "Django and Django REST framework") from exc

from starlette.authentication import AuthCredentials
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import AuthenticationError, MissingCredentials
from .middleware import APIKeyMiddleware
from .principal import APIKeyUser
from .responses import error_code, www_authenticate


class KeystileUser:
    """The verified key as Django and DRF expect ``request.user`` to look.

    ``is_authenticated`` is true, ``display_name`` (and ``str()``) is ``apikey:<name>``,
    ``pk`` and ``id`` are the key id (DRF's throttles key on ``pk``), and ``key`` is the
    :class:`~keystile.APIKeyUser` itself. A key holds scopes, not Django permissions:
    ``has_perm`` is false and ``is_staff``/``is_superuser`` are false, so the admin and
    ``DjangoModelPermissions`` never admit a key; check scopes with :meth:`has_scopes`
    or :class:`HasScopes`.
    """

    __slots__ = (
        "display_name",
        "id",
        "key",
        "key_id",
        "metadata",
        "name",
        "owner",
        "pk",
        "scopes",
        "username",
    )

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, key: APIKeyUser) -> None:
        self.key = key
        self.pk = self.id = self.key_id = key.key_id
        self.owner, self.name, self.scopes = key.owner, key.name, key.scopes
        self.metadata = key.metadata
        self.display_name = self.username = key.display_name

    def get_username(self) -> str:
        return self.key.display_name

    def has_scopes(self, *scopes: str) -> bool:
        """Whether the key holds every one of ``scopes`` ("authenticated" always)."""
        return self.key.has_scopes(*scopes)

    def has_perm(self, perm: str, obj: object = None) -> bool:
        return False

    def has_perms(self, perm_list: Collection[str], obj: object = None) -> bool:
        return not perm_list

    def has_module_perms(self, app_label: str) -> bool:
        return False

    def get_user_permissions(self, obj: object = None) -> set[str]:
        return set()

    def get_group_permissions(self, obj: object = None) -> set[str]:
        return set()

    def get_all_permissions(self, obj: object = None) -> set[str]:
        return set()

    def __str__(self) -> str:
        return self.key.display_name

    def __repr__(self) -> str:
        return f"KeystileUser({self.key!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeystileUser):
            return NotImplemented
        return self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def _keystile_scope(request: Any) -> Scope:
    """The ASGI scope ``APIKeyMiddleware`` authenticated (``request`` is Django's or DRF's)."""
    scope = getattr(request, "scope", None)
    adapters.find_middleware(
        scope,
        reader="keystile.django reads",
        place="Django: serve application = keystile.django.protect(get_asgi_application(), "
        "...) with an ASGI server",
        error=ImproperlyConfigured,
    )
    return cast(Scope, scope)


def _verified_key(scope: Scope) -> APIKeyUser | None:
    user = scope.get("user")
    return user if isinstance(user, APIKeyUser) else None


def _bare_challenge(scope: Scope) -> str:
    challenge = www_authenticate(MissingCredentials(), scope["keystile"].realm)
    assert challenge is not None
    return challenge


class KeystileAuthentication(BaseAuthentication):  # type: ignore[misc]
    """DRF authentication: ``request.user`` is the key (a :class:`KeystileUser`) and
    ``request.auth`` its Starlette ``AuthCredentials`` (``request.auth.scopes`` lists
    ``"authenticated"`` and the key's scopes).

    A request without a key (an exempt path, or ``required=False``) is not authenticated
    by this class, so DRF tries the next one; if none succeeds, a permission that needs
    a user answers 401 with keystile's ``WWW-Authenticate: Bearer realm="…"``, provided
    this class is listed first. List it before ``SessionAuthentication``: that class
    also accepts the ``request.user`` :class:`KeystileUserMiddleware` sets, and then
    demands a CSRF token.
    """

    def authenticate(self, request: Any) -> tuple[KeystileUser, AuthCredentials] | None:
        scope = _keystile_scope(request)
        key = _verified_key(scope)
        if key is None:
            return None
        return KeystileUser(key), scope["auth"]

    def authenticate_header(self, request: Any) -> str:
        return _bare_challenge(_keystile_scope(request))


class KeystileRefusal(APIException):  # type: ignore[misc]
    """A keystile refusal in DRF: the middleware's status and body (DRF's exception
    handler sends a ``detail`` that is a mapping as the body), and its challenge (DRF sends
    ``auth_header`` as ``WWW-Authenticate``). ``headers`` holds every header the
    middleware sends, which :func:`exception_handler` adds."""

    def __init__(self, refusal: AuthenticationError, middleware: APIKeyMiddleware) -> None:
        super().__init__(detail=refusal.description, code=error_code(refusal))
        adapters.count_refusal(middleware, refusal)
        answer = adapters.Refusal.of(refusal, middleware)
        self.status_code = answer.status_code
        self.detail = answer.body
        self.headers = answer.headers
        self.auth_header = self.headers.get("WWW-Authenticate")
        self.auth_error = refusal


def exception_handler(exc: Exception, context: dict[str, Any]) -> Any:
    """DRF's exception handler, answering as the middleware does: a
    :class:`KeystileRefusal` with all its headers (``Cache-Control`` too), and DRF's 401
    for a request without a key (a view needing a user, reached on an exempt path or with
    ``required=False``) with keystile's body, when :class:`KeystileAuthentication` is the
    view's first authentication class. Everything else goes to DRF's handler untouched.
    ``REST_FRAMEWORK = {"EXCEPTION_HANDLER": "keystile.django.exception_handler"}``.
    """
    # Imported here: rest_framework.views reads the DRF settings, which name this module.
    from rest_framework.views import exception_handler as drf_exception_handler

    request = context.get("request")
    authenticators = getattr(request, "authenticators", None) or ()
    if (
        isinstance(exc, NotAuthenticated)
        and authenticators
        and isinstance(authenticators[0], KeystileAuthentication)
    ):
        exc = KeystileRefusal(MissingCredentials(), _keystile_scope(request)["keystile"])
    response = drf_exception_handler(exc, context)
    if isinstance(exc, KeystileRefusal) and response is not None:
        for name, value in exc.headers.items():
            response[name] = value
    return response


class HasScopes(BasePermission):  # type: ignore[misc]
    """DRF permission: the key must hold every scope the view declares.

    ``required_scopes = ["items:read"]`` on the view (or :func:`require_scopes` for a
    function view). Without a key (and no other authentication class authenticated the
    request), 401; when the key lacks a scope, 403 ``insufficient_scope``: both as
    :class:`KeystileRefusal`, the middleware's status, body and challenge. A view that
    uses it without declaring scopes is a programming error (``ImproperlyConfigured``),
    not an open door.
    """

    scopes: Sequence[str] | None = None

    def has_permission(self, request: Any, view: Any) -> bool:
        required = self.scopes if self.scopes is not None else self._declared(view)
        scope = _keystile_scope(request)
        refusal = adapters.scope_refusal(scope.get("user"), tuple(required))
        if refusal is None:
            return True
        if isinstance(refusal, MissingCredentials) and (
            getattr(request, "successful_authenticator", None) is not None
        ):
            return False  # a user of another authentication class: DRF's 403
        raise KeystileRefusal(refusal, scope["keystile"])

    @staticmethod
    def _declared(view: Any) -> tuple[str, ...]:
        declared = getattr(view, "required_scopes", None)
        if declared is None or isinstance(declared, str):
            raise ImproperlyConfigured(
                f"{type(view).__name__} uses HasScopes but declares no required_scopes "
                '(a list, e.g. required_scopes = ["items:read"])'
            )
        return tuple(dict.fromkeys(declared))


def require_scopes(*scopes: str) -> type[HasScopes]:
    """A :class:`HasScopes` with its own scopes, for function views:

    @api_view(["POST"])
    @permission_classes([require_scopes("items:write")])
    def create_item(request): ...
    """
    required = adapters.required_scopes(scopes)
    return type(f"HasScopes({' '.join(required)})", (HasScopes,), {"scopes": required})


GetResponse = Callable[[Any], Any]


class KeystileUserMiddleware:
    """Django middleware: ``request.user`` is the key (a :class:`KeystileUser`) for plain
    Django views, and ``request.auth`` its ``AuthCredentials``.

    Put it after ``AuthenticationMiddleware``, which would otherwise replace the key with
    the session's user. Without a key, ``request.user`` is left as it was (the session's
    user or ``AnonymousUser``; ``AnonymousUser`` if nothing set one and
    ``django.contrib.auth`` is installed).

    A request authenticated by a key skips Django's CSRF check: CSRF abuses credentials
    a browser attaches by itself (cookies), and a key travels in a header no other site
    can make a browser send.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self._is_async:
            return self._acall(request)
        _attach(request)
        return self.get_response(request)

    async def _acall(self, request: Any) -> Any:
        _attach(request)
        response: Awaitable[Any] = self.get_response(request)
        return await response


def _attach(request: Any) -> None:
    scope = _keystile_scope(request)
    key = _verified_key(scope)
    if key is not None:
        request.user = KeystileUser(key)
        request.auth = scope["auth"]
        request._dont_enforce_csrf_checks = True
    elif not hasattr(request, "user") and apps.is_installed("django.contrib.auth"):
        from django.contrib.auth.models import AnonymousUser

        request.user = AnonymousUser()


class _DjangoLifespan:
    """Answers the ASGI lifespan protocol Django's ``ASGIHandler`` refuses, so the
    middleware in front of it gets its startup and shutdown (the final flush of
    ``last_used_at``). ``.app`` is Django's handler."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def protect(application: ASGIApp, **options: Any) -> APIKeyMiddleware:
    """``application = protect(get_asgi_application(), database_url=...)``.

    The same as ``APIKeyMiddleware(get_asgi_application(), **options)``, except that the
    ASGI lifespan reaches keystile: Django refuses it, so without this nothing writes the
    last pending ``last_used_at`` updates at shutdown.
    """
    return APIKeyMiddleware(_DjangoLifespan(application), **options)


__all__ = [
    "HasScopes",
    "KeystileAuthentication",
    "KeystileRefusal",
    "KeystileUser",
    "KeystileUserMiddleware",
    "exception_handler",
    "protect",
    "require_scopes",
]

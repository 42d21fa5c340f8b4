"""Settings of the minimal Django project the tests serve (views in ``django_views``).

``configure()`` sets Django up once per process, when a Django test first needs it.
Nothing else in the suite uses Django, so these settings cannot clash with another
test's; ``LOGGING_CONFIG = None`` keeps Django from reconfiguring the logging the rest of
the suite relies on. The views module is imported by Django itself (``ROOT_URLCONF``),
after ``configure()``, as DRF's views need settings to import.
"""

from __future__ import annotations

from typing import Any

import django
from django.conf import settings

SETTINGS: dict[str, Any] = {
    "DEBUG": False,
    "SECRET_KEY": "keystile-tests-only",
    "ALLOWED_HOSTS": ["test"],
    "ROOT_URLCONF": "django_views",
    "INSTALLED_APPS": ["django.contrib.contenttypes", "django.contrib.auth", "rest_framework"],
    "MIDDLEWARE": [
        "django.middleware.security.SecurityMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "keystile.django.KeystileUserMiddleware",
    ],
    "DATABASES": {},
    "USE_TZ": True,
    "LOGGING_CONFIG": None,
    "REST_FRAMEWORK": {
        "DEFAULT_AUTHENTICATION_CLASSES": ["keystile.django.KeystileAuthentication"],
        "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
        "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
        "EXCEPTION_HANDLER": "keystile.django.exception_handler",
    },
}


def configure() -> None:
    if not settings.configured:
        settings.configure(**SETTINGS)
        django.setup()

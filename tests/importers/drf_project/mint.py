"""Mint keys with djangorestframework-api-key's own API, as a Django project does, and
print them as JSON: two live keys, a revoked one, an expired one, and one whose hash is
Django's PBKDF2 password hash of the key, as version 1.x stored it.

Run as ``python -m drf_project.mint`` with ``DRF_PROJECT_DATABASE`` set (``settings.py``).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "drf_project.settings")

import django

django.setup()

from django.contrib.auth.hashers import PBKDF2PasswordHasher  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.utils import timezone  # noqa: E402
from rest_framework_api_key.models import APIKey  # noqa: E402

call_command("migrate", verbosity=0)
_, live = APIKey.objects.create_key(name="billing")
_, other = APIKey.objects.create_key(name="reports")
revoked_key, revoked = APIKey.objects.create_key(name="old laptop")
revoked_key.revoked = True
revoked_key.save()
_, expired = APIKey.objects.create_key(name="trial", expiry_date=timezone.now() - timedelta(days=1))
version_1, pbkdf2 = APIKey.objects.create_key(name="since 2019")
version_1.hashed_key = PBKDF2PasswordHasher().encode(pbkdf2, "drfsalt", iterations=1000)
version_1.save()
assert APIKey.objects.is_valid(live)  # (is_valid would upgrade the PBKDF2 hash)
print(json.dumps({"live": [live, other], "revoked": revoked, "expired": expired, "pbkdf2": pbkdf2}))

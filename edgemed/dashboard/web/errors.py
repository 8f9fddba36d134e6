"""The errors a route raises; the app answers each with its status (JSON under ``/api/``, ``error.html`` elsewhere)."""

from __future__ import annotations

__all__ = ["BadRequest", "Conflict", "Forbidden", "HttpError", "NotFound", "Unauthenticated"]


class HttpError(Exception):
    """An error the app answers with its status and message (JSON under ``/api/``, ``error.html`` elsewhere)."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(HttpError):
    """400: a malformed parameter or body; the message names it and what is expected."""

    status = 400


class Unauthenticated(HttpError):
    """401: nobody is logged in (or the session ended); pages redirect to ``/login?next=PATH``."""

    status = 401


class Forbidden(HttpError):
    """403: logged in, but this role or site is not allowed."""

    status = 403


class NotFound(HttpError):
    """404: no such thing (also for another site's thing, so its existence does not leak)."""

    status = 404


class Conflict(HttpError):
    """409: the action does not fit the current state (closing before acknowledging, twice)."""

    status = 409

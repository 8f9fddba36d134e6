"""The dashboard's web side: a Starlette app on uvicorn, Jinja2 pages, a JSON API, ``/metrics``.

Routes (each group in its own module, listed in ``app.ROUTE_MODULES``):
    GET/POST /login, POST /logout, GET /api/me           ``auth_routes``
    GET /api/fleet, /api/results, /api/summary, /api/dead-letters, /metrics     ``api_routes``
    the review queue, results and settings                ``review_routes``
    the live stream, the fleet view and charts           ``live``, ``fleet_routes``
    users and the audit trail                             ``admin_routes``
    /static/...                                           files of ``web/static`` (no CDN, no inline code)

Security model. Everything shown comes from devices and may be hostile text: templates autoescape, and the
Content-Security-Policy (``security.CSP``) allows no inline script or style, so a missed spot could not run
injected code. Every route but ``/login``, ``/static`` and ``/metrics`` needs a logged-in user
(``context.require``), re-read from the database on each request; sessions live in the database
(``sessions.py``) so several processes behind a load balancer behave as one. Every request but GET/HEAD/OPTIONS carries
its session's CSRF token and, from a browser, a same-origin ``Origin`` (``security.py``). On a loopback binding the
``Host`` header must name the loopback (DNS rebinding). ``/metrics`` needs no login and answers only to
``--metrics-allow``. Single sign-on from a reverse proxy's header is believed only from ``--trusted-proxy``.
"""

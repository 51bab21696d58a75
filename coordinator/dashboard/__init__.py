"""The web dashboard: static pages served by the coordinator's Flask app, plotted client-side.

No build step and no external assets: HTML, CSS and plain JavaScript in ``static/``, which read the
coordinator's JSON API (``coordinator.api``) and poll it while a task runs.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, redirect, send_from_directory

STATIC = Path(__file__).with_name("static")


def dashboard_blueprint() -> Blueprint:
    bp = Blueprint("dashboard", __name__, url_prefix="/dashboard")

    @bp.get("/")
    def manufacturer() -> Response:
        return send_from_directory(STATIC, "index.html")

    @bp.get("/customer")
    def customer() -> Response:
        return send_from_directory(STATIC, "customer.html")

    @bp.get("/static/<path:name>")
    def static_file(name: str) -> Response:
        return send_from_directory(STATIC, name)

    return bp


def root_redirect() -> Response:
    return redirect("/dashboard/")  # type: ignore[return-value]

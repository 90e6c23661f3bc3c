"""The seed's recipe, the baseline of ``signup.py``: the e-mail chapter of Flasky (Flask,
Flask-Mail, a thread per mail) with the JSON sign-up the reference app serves, served from
``bench/`` as ``gunicorn --workers 2 recipe:app``. One :mod:`sqlite3` connection per worker with
the reference app's settings (WAL, ``synchronous=NORMAL``: else the disk's fsync is measured).
Settings: ``MAIL_SERVER``, ``MAIL_PORT``, ``FLASKY_ADMIN``, ``RECIPE_DATABASE`` (the file).
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
from threading import Thread
from typing import Any

from flask import Flask, render_template, request
from flask_mail import Mail, Message

app = Flask(__name__, template_folder=pathlib.Path(__file__).parent.parent / "templates")
app.config.update(
    MAIL_SERVER=os.environ.get("MAIL_SERVER", "localhost"),
    MAIL_PORT=int(os.environ.get("MAIL_PORT", "25")),
    FLASKY_ADMIN=os.environ.get("FLASKY_ADMIN"),
    FLASKY_MAIL_SUBJECT_PREFIX="[Flasky] ",
    FLASKY_MAIL_SENDER="Flasky Admin <flasky@example.com>",
    DATABASE=os.environ.get("RECIPE_DATABASE", "recipe.sqlite"),
)
mail = Mail(app)
db = sqlite3.connect(app.config["DATABASE"], timeout=30)  # each worker's, made at import
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=NORMAL")
db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, username TEXT UNIQUE)")


# The chapter's two functions, as it writes them.
def send_async_email(app: Flask, msg: Message) -> None:
    with app.app_context():
        mail.send(msg)


def send_email(to: str, subject: str, template: str, **kwargs: Any) -> Thread:
    msg = Message(
        app.config["FLASKY_MAIL_SUBJECT_PREFIX"] + subject,
        sender=app.config["FLASKY_MAIL_SENDER"],
        recipients=[to],
    )
    msg.body = render_template(template + ".txt", **kwargs)
    msg.html = render_template(template + ".html", **kwargs)
    thr = Thread(target=send_async_email, args=[app, msg])
    thr.start()
    return thr


@app.post("/api/users")
def create_user() -> tuple[dict[str, Any], int]:
    data = request.get_json()  # Flask answers 400 or 415 for a body that is not JSON
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not 1 <= len(name := name.strip()) <= 64:
        return {"error": "name: 1 to 64 characters"}, 422
    with db:  # commits
        new = db.execute("INSERT INTO users (username) VALUES (?) ON CONFLICT DO NOTHING", (name,))
    (user_id,) = db.execute("SELECT id FROM users WHERE username = ?", (name,)).fetchone()
    user = {"id": user_id, "username": name}
    if new.rowcount and app.config["FLASKY_ADMIN"]:
        send_email(app.config["FLASKY_ADMIN"], "New User", "mail/new_user", user=user)
    return {"id": user_id, "name": name}, 201 if new.rowcount else 200

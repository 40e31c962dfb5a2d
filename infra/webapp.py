"""What both Flask apps share: the app factory, wiring settings to the chain and IPFS, retries, JSON
errors, request guards (hosts, size cap, bounded JSON, CSRF), the HTTP server, jobs, phase timing."""
from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlsplit

import orjson
import requests
import waitress
from flask import Blueprint, Flask, abort, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask_wtf.csrf import CSRFError, CSRFProtect
from waitress import trigger, wasyncore
from werkzeug.exceptions import BadRequest, HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from infra import chain, ipfs
from infra.settings import Settings

BODY_LIMIT = 64 * 1024  # bytes of any request body
# base.html, which both apps' pages extend, and the script that keeps their live parts current
shared_templates = Blueprint("shared", __name__, template_folder="templates", static_folder="static",
                             static_url_path="/static/shared")


class ActionError(Exception):
    """A request that cannot be carried out now; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def open_store(settings: Settings) -> ipfs.ContentStore:
    return ipfs.open_store(settings.ipfs_api, settings.state_dir, timeout=settings.timeout)


def find_registry(w3, settings: Settings) -> chain.Registry | None:
    """The deployed registry recorded for this chain, or None when there is none yet."""
    address = chain.find_deployment(w3, settings.contract_record)
    return chain.Registry(w3, address) if address else None


def describe_error(exc: BaseException) -> str:
    """One line for a page or a JSON answer: the exception's own words and its kind."""
    if isinstance(exc, chain.ContractError):
        return f"contract reverted: {exc}"
    if isinstance(exc, ActionError):  # already written for the user
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# How a person brings each service back: what the pages say when it does not answer.
SERVICES = {"chain": ("The chain", "python run.py chain", "FL_CHAIN_URL"),
            "ipfs": ("The IPFS node", "python run.py ipfs", "FL_IPFS_API")}


def outage_text(service: str, url: str, exc: BaseException) -> str:
    """A failure to reach the chain or IPFS in words: what is down and how to start it. A failure
    that is not an outage (the node answered, but with an error) keeps its own words."""
    if not isinstance(exc, (chain.ChainUnavailable, ipfs.StorageUnavailable, requests.ConnectionError,
                            requests.Timeout, ConnectionError, TimeoutError)):
        return describe_error(exc)
    name, command, variable = SERVICES[service]
    return f"{name} at {url} does not answer. Start it with `{command}`, or point {variable} at one that runs."


# Outages of the chain or IPFS are reported as 503 so callers know to retry later.
UNAVAILABLE = (chain.ChainUnavailable, ipfs.StorageUnavailable, ipfs.StorageTimeout)
# A node that refuses connections may be restarting: worth a few retries. A timeout is not retried,
# since content the node cannot find would only time out again.
REFUSED = (chain.ChainUnavailable, ipfs.StorageUnavailable)

log = logging.getLogger("webapp")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"  # every app's log lines
T = TypeVar("T")


def deadline_text(deadline: int) -> str | None:
    """A deadline (unix seconds) as people read it: the UTC time and how far away it is."""
    if not deadline:
        return None
    left = deadline - time.time()
    when = time.strftime("%H:%M:%S UTC", time.gmtime(deadline))
    return f"{when} ({left:.0f} s left)" if left >= 0 else f"{when} (passed {-left:.0f} s ago)"


def retrying(settings: Settings, what: str, call: Callable[[], T]) -> T:
    """`call()`, retried `settings.retries` times with doubling waits while the chain or IPFS node
    refuses connections; the last outage is raised. Only for calls that are safe to repeat."""
    attempt = 0
    while True:
        try:
            return call()
        except REFUSED as exc:
            if attempt >= settings.retries:
                raise
            wait = settings.retry_backoff * 2 ** attempt
            log.warning("%s: %s; retrying in %.1f s", what, exc, wait)
            time.sleep(wait)
            attempt += 1


READ_TIMEOUT = 10  # seconds a connection may stall mid-request before it is dropped
SERVER_THREADS = 8  # requests served at once; a waiting participate or aggregate call holds one


class BoundedRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler with a socket timeout: a client that announces a body and never
    sends it (or sends it a byte at a time) holds a worker thread for at most this long."""
    timeout = READ_TIMEOUT


class WaitressServer:
    """waitress serving `app`, under the names of Werkzeug's server (port, serve_forever, and
    shutdown from another thread), so that either is run alike.

    waitress reads a whole request before a worker thread sees it: a stalled one holds no
    thread, and its connection is dropped after READ_TIMEOUT s without a byte (looked for every
    second). It buffers at most twice the apps' body cap; a body up to that reaches the app,
    whose guard answers JSON 413 past the cap, and one beyond it gets waitress's own 413."""

    def __init__(self, app: Flask, host: str, port: int) -> None:
        self.sockets: dict = {}  # every socket waitress's loop watches, by file descriptor
        self.server = waitress.create_server(app, map=self.sockets, threads=SERVER_THREADS, host=host, port=port,
                                             channel_timeout=READ_TIMEOUT, cleanup_interval=1,
                                             max_request_body_size=2 * BODY_LIMIT)
        self.waker = trigger.trigger(self.sockets)  # runs a function in the loop's thread (shutdown)
        # A host of several addresses (localhost: IPv4 and IPv6) gets a server on each, all on `port`.
        self.port = int(getattr(self.server, "effective_port", port))

    def serve_forever(self) -> None:
        self.server.run()

    def shutdown(self) -> None:
        """Stop serve_forever, which runs in another thread: that thread closes every socket (no
        other may while it waits on them), and its loop ends with none left."""
        closed = threading.Event()

        def close_all() -> None:
            wasyncore.close_all(self.sockets)
            closed.set()

        self.waker.pull_trigger(close_all)
        closed.wait()
        self.server.task_dispatcher.shutdown()


def http_server(app: Flask, host: str, port: int, debug: bool = False) -> WaitressServer | BaseWSGIServer:
    """The server for `app` at host:port: waitress, or with `debug` Werkzeug's development server
    (a thread per request, bounded body reads). An address it cannot take raises SystemExit
    with one line that names the flags to change."""
    try:
        if debug:
            return make_server(host, port, app, threaded=True, request_handler=BoundedRequestHandler)
        return WaitressServer(app, host, port)
    except OSError as exc:  # waitress: a port in use, an address of no interface here, an unknown name
        reason = f" ({exc.strerror or exc})"
    except SystemExit:  # Werkzeug has said why on stderr
        reason = ""
    raise SystemExit(f"cannot serve on {host}:{port}{reason}: choose another with --host or --port")


def serve(app: Flask, host: str, port: int, debug: bool = False) -> None:
    """Serve `app` until interrupted (Ctrl-C, or SIGTERM where run.py turns it into one)."""
    server = http_server(app, host, port, debug)
    what = "Werkzeug's development server, for debugging only" if debug else "waitress"
    print(f" * Running on http://{host}:{server.port} ({what}); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # waitress stops by itself on it; Werkzeug's server lets it through
        pass


def store_status(store: ipfs.ContentStore, url: str) -> dict[str, Any]:
    """Whether the IPFS node at `url` answers (the embedded store always does), for the status pages."""
    try:
        return {"ok": True, "backend": store.describe()}
    except ipfs.StorageError as exc:
        return {"ok": False, "error": outage_text("ipfs", url, exc)}


def install_json_errors(app: Flask) -> None:
    """Every error under /api answers JSON {"error": message}; no request ends in a bare 500 page."""

    def wants_json() -> bool:
        return request.path.startswith("/api/")

    @app.errorhandler(ActionError)
    def action_error(exc: ActionError):
        return jsonify(error=str(exc)), exc.status

    @app.errorhandler(chain.ContractError)
    def contract_error(exc):
        return jsonify(error=describe_error(exc), contract_error=exc.name), 409

    def unavailable(exc):
        return jsonify(error=describe_error(exc)), 503

    @app.errorhandler(413)
    def too_large(exc):  # also for pages: a form post this large is no browser's doing
        limit = app.config["MAX_CONTENT_LENGTH"]
        return jsonify(error=f"the request body is larger than the {limit} bytes allowed"), 413

    for outage in UNAVAILABLE:
        app.register_error_handler(outage, unavailable)

    @app.errorhandler(ipfs.StorageError)
    def bad_content(exc):  # missing, mismatching or oversized content: IPFS answered, but not usefully
        return jsonify(error=describe_error(exc)), 502

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if not wants_json():
            return exc
        return jsonify(error=exc.description or exc.name), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        app.logger.error("unexpected error: %s", traceback.format_exc())
        return jsonify(error=describe_error(exc)), 500


class BoundedJSONProvider(DefaultJSONProvider):
    """Request bodies decoded by orjson: it refuses nesting beyond 1,024 levels without recursing
    on Python's stack, where the standard decoder follows the recursion limit (which dependencies
    raise) into a stack overflow."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)


API_PREFIX = "/api"
STALE_FORM = "the form's security token is missing or stale: reload the page and try again"
csrf = CSRFProtect()


def install_request_guards(app: Flask) -> None:
    """Allowed Host names, a size cap for every body, bounded JSON, a CSRF token for every form
    post (Flask-WTF), and no cross-site JSON posts.

    Form posts (the dashboard buttons) carry the session's token. The JSON API has no session; a
    browser marks a cross-site request with an Origin header naming another site, so those are
    refused. A page on another site that rebinds its own name to this machine's address sends its
    own name as Host: only the names in `Settings.allowed_hosts` are served (400 otherwise).
    """
    app.json = BoundedJSONProvider(app)
    app.config["TRUSTED_HOSTS"] = list(app.config["SETTINGS"].allowed_hosts)
    app.config.setdefault("WTF_CSRF_TIME_LIMIT", None)  # a token lasts as long as its session: pages stay open

    @app.before_request
    def guard():
        limit = app.config.get("MAX_CONTENT_LENGTH")
        if limit is not None and (request.content_length or 0) > limit:
            abort(413)
        if limit is not None and request.content_length is None and "wsgi.input_terminated" in request.environ:
            # A chunked body is read through a stream that stops at the cap without a word: read
            # it now, and one byte more, which raises 413 when the body goes on past the cap.
            if len(request.get_data(cache=True)) == limit:
                request.stream.read(1)
        if request.method == "POST" and request.path.startswith(f"{API_PREFIX}/"):
            origin = request.headers.get("Origin")
            if origin and urlsplit(origin).netloc != request.host:
                abort(403, description=f"cross-site request from {origin} refused")

    csrf.init_app(app)  # after the guard: an oversized body is refused before its form is read

    @app.errorhandler(CSRFError)
    def stale_form(exc: CSRFError):
        return BadRequest(description=STALE_FORM)


def create_app(import_name: str, config: dict[str, Any] | None, role: str, default_role_config: Any,
               cookie_name: Callable[[Any], str], extensions: Callable[..., dict[str, Any]],
               blueprints: Callable[[], Sequence[Blueprint]]) -> Flask:
    """The app factory of both apps.

    `config` may carry SETTINGS, the role's own configuration under `role` (ORG_CONFIG,
    CLIENT_CONFIG), and for tests or the embedded demo ready-made W3, STORE and REGISTRY objects
    shared with other roles in the same process. `extensions(settings, role_config, w3, store,
    registry)` makes the app's services; `blueprints()` imports and returns its blueprints (the
    JSON API's, under /api, is exempt from the form token and guarded by Origin instead).
    """
    app = Flask(import_name)
    app.config.update(MAX_CONTENT_LENGTH=BODY_LIMIT)
    app.config.update(config or {})
    settings: Settings = app.config.setdefault("SETTINGS", Settings.from_env())
    app.config["SECRET_KEY"] = app.config.get("SECRET_KEY") or settings.secret_key or secrets.token_hex(32)
    role_config = app.config.setdefault(role, default_role_config)
    # Every app on 127.0.0.1 shares the browser's cookies (ports do not separate them): one name each.
    # (Flask's defaults already name it "session", so a setdefault would change nothing.)
    if "SESSION_COOKIE_NAME" not in (config or {}):
        app.config["SESSION_COOKIE_NAME"] = cookie_name(role_config)
    w3 = app.config.get("W3") or chain.connect(settings.chain_url)
    store = app.config.get("STORE") or open_store(settings)
    app.extensions.update(extensions(settings, role_config, w3, store, app.config.get("REGISTRY")))
    app.register_blueprint(shared_templates)
    for blueprint in blueprints():
        app.register_blueprint(blueprint)
        if blueprint.url_prefix == API_PREFIX:
            csrf.exempt(blueprint)
    install_request_guards(app)
    install_json_errors(app)
    return app


def json_body(**fields: type | tuple[type, ...]) -> dict[str, Any]:
    """The request's JSON object, with `fields` present and of the given types (400 otherwise)."""
    body = request.get_json(silent=True)
    if body is None:
        body = {} if not request.get_data() else None
    if not isinstance(body, dict):
        raise ActionError("the request body must be a JSON object", 400)
    for name, kind in fields.items():
        if name not in body:
            raise ActionError(f"missing field '{name}'", 400)
        value = body[name]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ActionError(f"field '{name}' has the wrong type", 400)
        if not isinstance(value, kind):
            raise ActionError(f"field '{name}' has the wrong type", 400)
    return body


@dataclass
class PhaseTimer:
    """Wall time per named phase (training, ipfs, chain, ...), summed over repeated phases."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.seconds.items()}


@dataclass
class Job:
    """One background action of an app (training, aggregation), observable while it runs."""

    name: str
    scene: str | None = None  # what the page showed when the job started: its failure belongs to that
    state: str = "running"  # running, done, failed
    step: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "scene": self.scene, "state": self.state, "step": self.step, "progress": self.progress,
            "result": self.result, "error": self.error, "started": self.started, "finished": self.finished,
        }


class JobRunner:
    """Runs at most one job at a time in a background thread; a second one is refused with 409."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: Job | None = None

    @property
    def busy(self) -> bool:
        return self.current is not None and self.current.state == "running"

    def start(self, name: str, work: Callable[[Job], Any], wait: bool = False, scene: str | None = None) -> Job:
        with self._lock:
            if self.busy:
                raise ActionError(f"'{self.current.name}' is still running; wait for it to finish", 409)
            job = self.current = Job(name, scene)

        failure: list[Exception] = []

        def run() -> None:
            try:
                job.result = work(job)
                job.state = "done"
            except Exception as exc:  # the job reports its failure; the app keeps serving
                failure.append(exc)
                job.error = describe_error(exc)
                job.state = "failed"
            finally:
                job.finished = time.time()

        if wait:
            run()
            if failure:  # a caller that waited gets the error itself, with its HTTP status
                raise failure[0]
        else:
            threading.Thread(target=run, name=name, daemon=True).start()
        return job

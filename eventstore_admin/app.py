"""The console's web application: pages, JSON for their scripts, the live log, and the operations.

Pages are rendered by Jinja with autoescaping, and every script builds the page with `textContent`:
event data, stream ids and error messages are untrusted text wherever they appear.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import jinja2
import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import Receive, Scope, Send

from eventstore_admin.backend import Backend, log_filters
from eventstore_admin.errors import ConsoleError, Forbidden, NotFound, Unavailable
from eventstore_admin.jobs import RebuildJobs
from eventstore_admin.model import EventView, LogPosition, parse_number
from eventstore_admin.sampler import LagSampler
from eventstore_admin.security import Guard, Redactor, Session, Sessions, allowed_hosts, mask_url, same_origin
from eventstore_admin.settings import AdminSettings

log = logging.getLogger(__name__)

PAGE_SIZE = 50
CSRF_HEADER = "x-csrf-token"
HEARTBEAT = 15.0
"""Seconds between keep-alive comments on a quiet live log, so proxies and browsers keep it open."""


class LiveLogs:
    """How many live logs are open, counted from the request's admission to the end of its response.

    Counting when the body starts would let a burst of requests all pass the check before any counted.
    Admission checks and counts without awaiting in between, so on the event loop it is one step.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def admit(self) -> Callable[[], None]:
        """Take a slot or refuse (503); the slot is given back by the returned function, however often called."""
        if self.open >= self.limit:
            raise Unavailable(f"{self.open} live logs are open already; close one")
        self.open += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open -= 1

        return release


class LiveLogResponse(StreamingResponse):
    """A live log's response: gives its slot back when it is over, whether the stream ended, the client
    went away, or the body never started (its generator's `finally` would then never run)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"x-accel-buffering": "no"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class AdminConsole:
    """The console's state for one server process: the backend, sessions, rebuild jobs and lag samples."""

    def __init__(self, settings: AdminSettings) -> None:
        self.settings = settings
        url = settings.database_url.get_secret_value()
        token = None if settings.token is None else settings.token.get_secret_value()
        self.redact = Redactor.for_settings(url, token)
        self.backend = Backend(
            url, settings.projections, query_timeout=settings.query_timeout, keys=settings.keys, redact=self.redact
        )
        self.sessions = Sessions(token, cookie_name=f"eventstore_admin_{settings.port}")
        self.jobs = RebuildJobs(self.backend, self.redact)
        self.sampler = LagSampler(self.backend, settings.sample_interval, settings.lag_window)
        self.database = mask_url(url)
        self.live_logs = LiveLogs(settings.max_live_logs)
        self.stopping = asyncio.Event()
        environment = jinja2.Environment(
            loader=jinja2.PackageLoader("eventstore_admin", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        environment.filters["when"] = _when
        environment.filters["age"] = _age
        self.templates = Jinja2Templates(env=environment)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.backend.start()
        self.sampler.start()
        try:
            yield
        finally:
            self.stopping.set()
            await self.sampler.stop()
            await self.jobs.stop()
            await self.backend.stop()

    # -- helpers ----------------------------------------------------------------------------------

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        session = self.sessions.session(request)
        context.setdefault("nav", "")
        context.update(
            request=request,
            database=self.database,
            signed_in=session is not None,
            csrf=None if session is None else session.csrf,
            can_sign_in=self.sessions.enabled,
        )
        return self.templates.TemplateResponse(request, template, context, status_code=status)

    async def authorize(self, request: Request) -> Session:
        """The session of a state-changing request, which must be signed in, same-origin and carry its CSRF token."""
        if not self.sessions.enabled:
            raise Forbidden("this console is read-only: start it with --token to operate")
        session = self.sessions.session(request)
        if session is None:
            raise Forbidden("sign in with the console's token first")
        if not same_origin(request):
            raise Forbidden("the request does not come from the console's own pages")
        offered = request.headers.get(CSRF_HEADER)
        if offered is None and request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            offered = str((await request.form()).get("csrf", ""))
        if not self.sessions.csrf_matches(session, offered):
            raise Forbidden("missing or wrong CSRF token: reload the page")
        return session

    async def on_error(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, ConsoleError):
            status, message = exc.status, self.redact(str(exc))
        else:
            log.error("unexpected error serving %s", request.url.path, exc_info=exc)
            status, message = 500, "internal error: see the console's log"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        return self.render(request, "error.html", status=status, message=message, status_code=status)

    async def on_not_found(self, request: Request, exc: Exception) -> Response:
        return await self.on_error(request, NotFound(f"no page at {request.url.path}"))

    # -- streams ----------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/streams", status_code=303)

    async def streams(self, request: Request) -> Response:
        q = request.query_params
        category, prefix = q.get("category", ""), q.get("prefix", "")
        page = await self.backend.search_streams(
            category=category, prefix=prefix, before=parse_number(q.get("before")), after=parse_number(q.get("after")),
            limit=PAGE_SIZE,
        )
        categories = await self.backend.categories()
        return self.render(
            request, "streams.html", nav="streams", page=page, category=category, prefix=prefix,
            categories=categories,
        )

    async def stream(self, request: Request) -> Response:
        stream_id = request.query_params.get("id", "")
        start = max(parse_number(request.query_params.get("from")) or 0, 0)
        info = await self.backend.stream(stream_id)
        events = await self.backend.stream_events(stream_id, start, PAGE_SIZE)
        last_page = max(info.version - info.version % PAGE_SIZE, 0)
        return self.render(
            request, "stream.html", nav="streams", info=info, events=events, start=start,
            previous=max(start - PAGE_SIZE, 0) if start > 0 else None,
            following=start + PAGE_SIZE if start + PAGE_SIZE <= info.version else None,
            last_page=last_page if last_page > start else None,
        )

    async def event(self, request: Request) -> Response:
        position = parse_number(request.query_params.get("position"))
        if position is None:
            raise ConsoleError("which event? give its position")
        event = await self.backend.event_at(position)
        return self.render(request, "event.html", nav="streams", event=event)

    # -- the live log -----------------------------------------------------------------------------

    async def log_page(self, request: Request) -> Response:
        q = request.query_params
        categories = await self.backend.categories()
        return self.render(
            request, "log.html", nav="log", category=q.get("category", ""), types=q.get("types", ""),
            categories=categories,
        )

    async def live(self, request: Request) -> Response:
        """The global log as server-sent events, a message per batch; reconnects resume gap-free.

        Each message's id is the log position of its last event, so the browser's automatic reconnect
        (which sends it back as Last-Event-ID) continues right after it.
        """
        q = request.query_params
        typed = [t.strip() for t in q.get("types", "").split(",") if t.strip()]
        category, types = log_filters(q.get("category"), typed)  # now: a bad filter is a 400, not a failed stream
        resume = request.headers.get("last-event-id") or q.get("after")
        after = LogPosition.parse(resume) if resume else None
        if resume and after is None:
            raise ConsoleError(f"not a log position: {resume!r}")
        release = self.live_logs.admit()  # last: nothing may fail between taking the slot and the response
        return LiveLogResponse(self._live(after, category, types), release)

    async def _live(
        self, after: LogPosition | None, category: str | None, types: list[str] | None
    ) -> AsyncIterator[str]:
        queue: asyncio.Queue[list[EventView] | Exception] = asyncio.Queue(maxsize=4)

        async def pump() -> None:
            # A task of its own: the subscription's cleanup must not run inside the response's
            # cancelled scope, where every await would be cancelled again.
            try:
                async with self.backend.follow(after, category=category, types=types) as batches:
                    async for batch in batches:
                        await queue.put(batch)
            except Exception as exc:
                await queue.put(exc)

        task = asyncio.get_running_loop().create_task(pump(), name="live log")
        try:
            yield "retry: 2000\n\n"
            while not self.stopping.is_set():
                try:
                    async with asyncio.timeout(HEARTBEAT):  # not wait_for: see LagSampler._run
                        item = await queue.get()
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if isinstance(item, Exception):
                    message = self.redact(str(item)) if isinstance(item, ConsoleError) else "the live log failed"
                    if not isinstance(item, ConsoleError):
                        log.error("live log failed", exc_info=item)
                    yield f"event: failure\ndata: {orjson.dumps({'error': message}).decode()}\n\n"
                    return
                last = item[-1]
                body = orjson.dumps([e.brief() for e in item]).decode()
                yield f"id: {last.log_xid}.{last.position}\nevent: events\ndata: {body}\n\n"
        finally:
            task.cancel()

    # -- projections ------------------------------------------------------------------------------

    async def projections_page(self, request: Request) -> Response:
        views = await self.sampler.sample()
        return self.render(
            request, "projections.html", nav="projections", projections=views,
            jobs={p.name: p for p in self.jobs.running()}, interval=self.settings.sample_interval,
        )

    async def projections_json(self, request: Request) -> Response:
        views = await self.sampler.sample() if request.query_params.get("fresh") else self.sampler.latest
        return JSONResponse(
            {
                "projections": [v.as_json() for v in views],
                "jobs": [p.as_json() for p in self.jobs.running()],
                "error": None if self.sampler.error is None else self.redact(self.sampler.error),
            }
        )

    async def lag_json(self, request: Request) -> Response:
        return JSONResponse(self.sampler.series())

    async def rebuild(self, request: Request) -> Response:
        await self.authorize(request)
        progress = self.jobs.start(request.path_params["name"])
        return JSONResponse({"message": f"rebuilding {progress.name}", "progress": progress.as_json()}, 202)

    async def rebuild_progress(self, request: Request) -> Response:
        name = request.path_params["name"]
        progress = self.jobs.progress(name)
        if progress is None:
            raise NotFound(f"no rebuild of {name!r} was started here")
        if progress.finished:
            self.sampler.poke()
        return JSONResponse(progress.as_json())  # its error was redacted as the job kept it

    async def reset(self, request: Request) -> Response:
        await self.authorize(request)
        name = request.path_params["name"]
        if not self.backend.declared(name):
            raise ConsoleError(f"projection {name!r} is not declared here: start the console with --app")
        await self.backend.reset(name)
        self.sampler.poke()
        return JSONResponse({"message": f"reset {name}: its runner replays it from the start of the log"})

    async def resume(self, request: Request) -> Response:
        await self.authorize(request)
        name = request.path_params["name"]
        resumed = await self.backend.resume(name)
        self.sampler.poke()
        message = f"resumed {name}: its runner retries the failed event" if resumed else f"{name} had not failed"
        return JSONResponse({"message": message})

    # -- outbox -----------------------------------------------------------------------------------

    async def outbox_page(self, request: Request) -> Response:
        view = await self.backend.outbox()
        owners = sorted({r.relay_id for r in view.relays})
        return self.render(
            request, "outbox.html", nav="outbox", outbox=view,
            relay_colour={name: i % 8 for i, name in enumerate(owners)},
        )

    async def outbox_json(self, request: Request) -> Response:
        return JSONResponse((await self.backend.outbox()).as_json())

    async def retry_one(self, request: Request) -> Response:
        await self.authorize(request)
        message_id = parse_number(request.path_params["id"])
        if message_id is None:
            raise ConsoleError("which message?")
        retried = await self.backend.retry_dead([message_id])
        if not retried:
            raise NotFound(f"message {message_id} is not dead (retried already?)")
        return JSONResponse({"message": f"message {message_id} is back in line"})

    async def retry_all(self, request: Request) -> Response:
        await self.authorize(request)
        retried = await self.backend.retry_dead(None)
        return JSONResponse({"message": f"{len(retried)} dead message(s) back in line"})

    # -- signing in -------------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html", nav="login", failed=False)

    async def login(self, request: Request) -> Response:
        """No CSRF token here: only a holder of the token can sign in, and other sites cannot post (origin)."""
        if not self.sessions.enabled:
            raise Forbidden("this console is read-only: start it with --token to operate")
        if not same_origin(request):
            raise Forbidden("the request does not come from the console's own pages")
        offered = str((await request.form()).get("token", ""))
        if not self.sessions.check_token(offered):
            await asyncio.sleep(1.0)  # guessing costs a second a try
            return self.render(request, "login.html", status=403, nav="login", failed=True)
        response = RedirectResponse("/projections", status_code=303)
        response.set_cookie(
            self.sessions.cookie_name, self.sessions.issue(), httponly=True, samesite="strict", path="/",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request) -> Response:
        session = await self.authorize(request)
        self.sessions.end(session)
        response = RedirectResponse("/streams", status_code=303)
        response.delete_cookie(self.sessions.cookie_name, path="/")
        return response


def create_app(settings: AdminSettings) -> Starlette:
    """The console as an ASGI application; its lifespan opens and closes the database connections."""
    console = AdminConsole(settings)
    routes = [
        Route("/", console.home),
        Route("/streams", console.streams),
        Route("/stream", console.stream),
        Route("/event", console.event),
        Route("/log", console.log_page),
        Route("/api/log", console.live),
        Route("/projections", console.projections_page),
        Route("/api/projections", console.projections_json),
        Route("/api/projections/lag", console.lag_json),
        Route("/api/projections/{name}/rebuild", console.rebuild, methods=["POST"]),
        Route("/api/projections/{name}/rebuild", console.rebuild_progress, methods=["GET"]),
        Route("/api/projections/{name}/reset", console.reset, methods=["POST"]),
        Route("/api/projections/{name}/resume", console.resume, methods=["POST"]),
        Route("/outbox", console.outbox_page),
        Route("/api/outbox", console.outbox_json),
        Route("/api/outbox/dead/retry", console.retry_all, methods=["POST"]),
        Route("/api/outbox/dead/{id}/retry", console.retry_one, methods=["POST"]),
        Route("/login", console.login_page, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("eventstore_admin", "static")]), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, hosts=allowed_hosts(settings.host, settings.allowed_hosts))],
        exception_handlers={ConsoleError: console.on_error, Exception: console.on_error, 404: console.on_not_found},
        lifespan=console.lifespan,
    )
    app.state.console = console
    return app


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(sep=" ", timespec="milliseconds")


def _age(seconds: float | None) -> str:
    """Seconds as people read them: 850 ms, 12.3 s, 4 min 5 s, 2 h 10 min."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"

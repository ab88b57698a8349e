"""The cart endpoints, and how the framework's errors become HTTP statuses."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from aggregates import AggregateNotFound
from eventstore import DatabaseUnavailable, InvalidArgument, WrongExpectedVersion
from eventstore_app import Application

from ..shop.domain import Cart, ShopError

# An entity tag is a quoted string; ours is the cart's stream version.
_ETAG = re.compile(r'\s*"(\d{1,18})"\s*')


class OpenCart(BaseModel):
    customer: str = Field(min_length=1, max_length=200)
    cart_id: str | None = Field(default=None, min_length=1, max_length=200, description="new random id if absent")


class AddItem(BaseModel):
    sku: str = Field(min_length=1, max_length=200)
    quantity: int = Field(description="the cart refuses a quantity below 1")
    price: int = Field(ge=0, description="in cents")


class CartLine(BaseModel):
    sku: str
    quantity: int
    price: int


class CartView(BaseModel):
    cart_id: str
    version: int
    customer: str
    lines: list[CartLine]
    total: int
    checked_out: bool

    @classmethod
    def of(cls, cart: Cart) -> CartView:
        lines = [CartLine(sku=sku, quantity=q, price=p) for sku, (q, p) in cart.state.lines.items()]
        return cls(
            cart_id=cart.id,
            version=cart.version,
            customer=cart.state.customer,
            lines=lines,
            total=sum(line.quantity * line.price for line in lines),
            checked_out=cart.state.checked_out,
        )


class Problem(BaseModel):
    detail: str


IfMatch = Annotated[str | None, Header(description='the ETag of the version the command must run on, e.g. "3"')]


def _version(if_match: str | None) -> int | None:
    """The cart version an If-Match header names; None without the header."""
    if if_match is None:
        return None
    match = _ETAG.fullmatch(if_match)
    if match is None:
        raise InvalidArgument(f'If-Match must be one entity tag this API sent, like "3"; got {if_match!r}')
    return int(match.group(1))


def _cart(response: Response, cart: Cart) -> CartView:
    response.headers["ETag"] = f'"{cart.version}"'
    return CartView.of(cart)


def create_api(app: Application, *, retries: int = 3) -> FastAPI:
    """The cart service of `app`, which its lifespan starts and stops; a conflict is retried `retries` times."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with app:
            yield

    api = FastAPI(title=f"{app.name}: carts", lifespan=lifespan)
    problems: dict[int | str, dict[str, object]] = {code: {"model": Problem} for code in (404, 409, 422, 503)}

    async def execute(cart_id: str, command: Callable[[Cart], None], if_match: str | None) -> Cart:
        """Run `command` on the cart: retried on conflict, or only at the version `if_match` names."""
        carts = app.repository(Cart)
        expected = _version(if_match)
        if expected is None:
            return await carts.execute(cart_id, command, retries=retries)
        cart = await carts.get(cart_id)
        if cart.version != expected:
            raise WrongExpectedVersion(cart.stream_id, expected, cart.version)
        command(cart)
        await carts.save(cart)  # expects `expected`: a write since the load is a conflict, not a retry
        return cart

    @api.post("/carts", status_code=201, responses=problems)
    async def open_cart(body: OpenCart, response: Response) -> CartView:
        cart_id = body.cart_id or uuid.uuid4().hex
        cart = await app.repository(Cart).execute(
            cart_id, lambda c: c.open(body.customer), retries=retries, create=True
        )
        response.headers["Location"] = f"/carts/{cart_id}"
        return _cart(response, cart)

    @api.post("/carts/{cart_id}/items", status_code=201, responses=problems)
    async def add_item(cart_id: str, body: AddItem, response: Response, if_match: IfMatch = None) -> CartView:
        cart = await execute(cart_id, lambda c: c.add(body.sku, body.quantity, body.price), if_match)
        return _cart(response, cart)

    @api.get("/carts/{cart_id}", responses=problems)
    async def read_cart(cart_id: str, response: Response) -> CartView:
        return _cart(response, await app.repository(Cart).get(cart_id))

    @api.exception_handler(AggregateNotFound)
    async def not_found(_: Request, exc: AggregateNotFound) -> JSONResponse:
        return _problem(404, f"no cart {exc.aggregate_id!r}")

    @api.exception_handler(WrongExpectedVersion)
    async def conflict(_: Request, exc: WrongExpectedVersion) -> JSONResponse:
        return _problem(
            409,
            f"the cart is at version {exc.actual}, not {exc.expected}: it changed since it was read; "
            "read it again and decide again",
        )

    @api.exception_handler(ShopError)
    async def refused(_: Request, exc: ShopError) -> JSONResponse:
        return _problem(422, str(exc))

    @api.exception_handler(InvalidArgument)
    async def invalid(_: Request, exc: InvalidArgument) -> JSONResponse:
        return _problem(422, str(exc))

    @api.exception_handler(RequestValidationError)
    async def malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        reasons = "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors())
        return _problem(422, f"invalid request: {reasons}")

    @api.exception_handler(DatabaseUnavailable)
    async def unavailable(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return _problem(503, str(exc))

    return api


def _problem(code: int, detail: str) -> JSONResponse:
    return JSONResponse(Problem(detail=detail).model_dump(), status_code=code)

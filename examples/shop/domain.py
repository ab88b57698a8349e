"""The shop's aggregates: each command validates against current state and emits events."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from aggregates import Aggregate, DomainEvent, PersonalData, applies

CustomerData = Annotated[str | None, PersonalData(subject="customer")]
"""A customer's personal data: stored encrypted, redacted once `store.forget(customer)` ran."""


class ShopError(Exception):
    """A command the shop refuses (business rule), as opposed to a technical failure."""


# -- products and stock ----------------------------------------------------------------------------


class ProductListed(DomainEvent):
    sku: str
    price: int
    stock: int


class StockReserved(DomainEvent):
    order_id: str
    quantity: int


class StockReleased(DomainEvent):
    order_id: str
    quantity: int


class ProductState(BaseModel):
    sku: str = ""
    price: int = 0
    available: int = 0
    reserved: int = 0
    reservations: dict[str, int] = Field(default_factory=dict)


class Product(Aggregate[ProductState], category="product", snapshot_every=50):
    """Stock of one product. Popular products see concurrent reservations: the demo's conflicts."""

    def list_for_sale(self, price: int, stock: int) -> None:
        if not self.is_new:
            raise ShopError(f"product {self.id} is already listed")
        self._emit(ProductListed(sku=self.id, price=price, stock=stock))

    def reserve(self, order_id: str, quantity: int) -> bool:
        if order_id in self.state.reservations:
            return True  # the command ran before: reserving is idempotent per order
        if quantity > self.state.available:
            return False
        self._emit(StockReserved(order_id=order_id, quantity=quantity))
        return True

    def release(self, order_id: str) -> None:
        quantity = self.state.reservations.get(order_id)
        if quantity is not None:
            self._emit(StockReleased(order_id=order_id, quantity=quantity))

    @applies(ProductListed)
    def _listed(self, event: ProductListed) -> None:
        self.state.sku = event.sku
        self.state.price = event.price
        self.state.available = event.stock

    @applies(StockReserved)
    def _reserved(self, event: StockReserved) -> None:
        self.state.available -= event.quantity
        self.state.reserved += event.quantity
        self.state.reservations[event.order_id] = event.quantity

    @applies(StockReleased)
    def _released(self, event: StockReleased) -> None:
        self.state.available += event.quantity
        self.state.reserved -= event.quantity
        del self.state.reservations[event.order_id]


# -- carts ---------------------------------------------------------------------------------------


class CartOpened(DomainEvent):
    customer: str
    email: CustomerData = None


class ItemAdded(DomainEvent):
    sku: str
    quantity: int
    price: int


class ItemRemoved(DomainEvent):
    sku: str


class CartCheckedOut(DomainEvent):
    order_id: str


class CartState(BaseModel):
    customer: str = ""
    email: str | None = None
    lines: dict[str, tuple[int, int]] = Field(default_factory=dict)  # sku -> (quantity, price)
    checked_out: bool = False


class Cart(Aggregate[CartState], category="cart"):
    def open(self, customer: str, email: str | None = None) -> None:
        if not self.is_new:
            raise ShopError(f"cart {self.id} is already open")
        self._emit(CartOpened(customer=customer, email=email))

    def add(self, sku: str, quantity: int, price: int) -> None:
        self._open_for_changes()
        if quantity <= 0:
            raise ShopError("quantity must be positive")
        self._emit(ItemAdded(sku=sku, quantity=quantity, price=price))

    def remove(self, sku: str) -> None:
        self._open_for_changes()
        if sku not in self.state.lines:
            raise ShopError(f"{sku} is not in cart {self.id}")
        self._emit(ItemRemoved(sku=sku))

    def check_out(self, order_id: str) -> None:
        self._open_for_changes()
        if not self.state.lines:
            raise ShopError(f"cart {self.id} is empty")
        self._emit(CartCheckedOut(order_id=order_id))

    def _open_for_changes(self) -> None:
        if self.is_new or self.state.checked_out:
            raise ShopError(f"cart {self.id} is not open")

    @applies(CartOpened)
    def _opened(self, event: CartOpened) -> None:
        self.state.customer = event.customer
        self.state.email = event.email

    @applies(ItemAdded)
    def _added(self, event: ItemAdded) -> None:
        quantity, _ = self.state.lines.get(event.sku, (0, event.price))
        self.state.lines[event.sku] = (quantity + event.quantity, event.price)

    @applies(ItemRemoved)
    def _removed(self, event: ItemRemoved) -> None:
        del self.state.lines[event.sku]

    @applies(CartCheckedOut)
    def _checked_out(self, event: CartCheckedOut) -> None:
        self.state.checked_out = True


# -- orders and payments ---------------------------------------------------------------------------


class OrderLine(BaseModel):
    sku: str
    quantity: int
    price: int


class OrderPlaced(DomainEvent):
    customer: str
    lines: list[OrderLine]
    total: int
    ship_to: CustomerData = None


class PaymentCaptured(DomainEvent):
    amount: int
    payment_id: str


class OrderShipped(DomainEvent):
    pass


class OrderCancelled(DomainEvent):
    reason: str


class OrderState(BaseModel):
    customer: str = ""
    ship_to: str | None = None
    lines: list[OrderLine] = Field(default_factory=list)
    total: int = 0
    paid: int = 0
    status: str = "new"


class Order(Aggregate[OrderState], category="order"):
    def place(self, customer: str, lines: list[OrderLine], ship_to: str | None = None) -> None:
        if not self.is_new:
            raise ShopError(f"order {self.id} is already placed")
        if not lines:
            raise ShopError("an order needs at least one line")
        total = sum(ln.quantity * ln.price for ln in lines)
        self._emit(OrderPlaced(customer=customer, lines=lines, total=total, ship_to=ship_to))

    def capture_payment(self, payment_id: str) -> None:
        if self.state.status != "placed":
            raise ShopError(f"order {self.id} is {self.state.status}, cannot take payment")
        self._emit(PaymentCaptured(amount=self.state.total, payment_id=payment_id))

    def ship(self) -> None:
        if self.state.status != "paid":
            raise ShopError(f"order {self.id} is {self.state.status}, cannot ship")
        self._emit(OrderShipped())

    def cancel(self, reason: str) -> None:
        if self.state.status in ("shipped", "cancelled"):
            raise ShopError(f"order {self.id} is {self.state.status}, cannot cancel")
        self._emit(OrderCancelled(reason=reason))

    @applies(OrderPlaced)
    def _placed(self, event: OrderPlaced) -> None:
        self.state.customer = event.customer
        self.state.ship_to = event.ship_to
        self.state.lines = list(event.lines)
        self.state.total = event.total
        self.state.status = "placed"

    @applies(PaymentCaptured)
    def _paid(self, event: PaymentCaptured) -> None:
        self.state.paid += event.amount
        self.state.status = "paid"

    @applies(OrderShipped)
    def _shipped(self, event: OrderShipped) -> None:
        self.state.status = "shipped"

    @applies(OrderCancelled)
    def _cancelled(self, event: OrderCancelled) -> None:
        self.state.status = "cancelled"

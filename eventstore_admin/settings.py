"""How the console is started: where it listens, which database it shows, and who may change things."""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from eventstore import KeyProvider
from eventstore_admin.backend import DeclaredProjection
from eventstore_admin.errors import ConsoleError
from eventstore_admin.security import MIN_TOKEN_LENGTH


class AdminSettings(BaseModel):
    """Validated once at start; bad values raise `ConsoleError` with pydantic's explanation."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    database_url: SecretStr
    projections: list[DeclaredProjection] = Field(default_factory=list)
    """The projections the console may rebuild and reset (it runs their handlers): `--app`."""
    keys: KeyProvider | None = None
    """The master key of personal data, for those rebuilds and resets: without it they would write every
    sealed field as `REDACTED` (the application's key with `--app`, else `EVENTSTORE_MASTER_KEY`)."""
    token: SecretStr | None = None
    """Without one the console is read-only; with one, an operator signs in with it to change things."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    allowed_hosts: list[str] = Field(default_factory=list)
    """Host names besides the bind address and loopback that browsers may use to reach the console."""
    sample_interval: float = Field(default=2.0, gt=0)
    lag_window: float = Field(default=600.0, gt=0)
    """Seconds of lag history the projections chart shows."""
    max_live_logs: int = Field(default=16, gt=0)
    """Live logs open at once: each holds a database connection of its own while it listens."""
    query_timeout: float = Field(default=10.0, gt=0)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConsoleError(f"admin console settings: {exc}") from None

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"the token must have at least {MIN_TOKEN_LENGTH} characters; "
                "`python -c 'import secrets; print(secrets.token_urlsafe())'` makes one"
            )
        return token

    @field_validator("host")
    @classmethod
    def _address(cls, host: str) -> str:
        if not host:
            raise ValueError("the bind address must be given")
        return host

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the console."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def read_only(self) -> bool:
        return self.token is None

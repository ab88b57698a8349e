"""Event contracts: JSON Schemas of the event types, compatibility checks against a lock file, AsyncAPI.

    contracts = Contracts.of(APP)                    # from the application's declaration
    result = check(contracts, read_lock("eventstore.schemas.lock"))
    for problem in result.breaking:                  # e.g. OrderPlaced v1 field 'total': type changed ...
        print(problem)

The `eventstore schemas check|lock|export|verify-stored` and `eventstore asyncapi` commands run these.
"""

from eventstore_contracts.asyncapi import asyncapi_document
from eventstore_contracts.compatibility import CheckResult, Incompatibility, check, compare
from eventstore_contracts.errors import ContractError, EventSchemaError, LockFileError, SchemaUnreadable
from eventstore_contracts.export import all_versions, export_schemas, schema_folder, standalone_schema
from eventstore_contracts.lock import (
    DEFAULT_LOCK_FILE,
    LOCK_FORMAT,
    SchemaLock,
    lock_text,
    locked,
    parse_lock,
    read_lock,
    write_lock,
)
from eventstore_contracts.model import Contracts, EventContract, TopicContract, event_schema
from eventstore_contracts.stored import StoredReport, StoredVersion, verify_stored

__all__ = [
    "DEFAULT_LOCK_FILE",
    "LOCK_FORMAT",
    "CheckResult",
    "ContractError",
    "Contracts",
    "EventContract",
    "EventSchemaError",
    "Incompatibility",
    "LockFileError",
    "SchemaLock",
    "SchemaUnreadable",
    "StoredReport",
    "StoredVersion",
    "TopicContract",
    "all_versions",
    "asyncapi_document",
    "check",
    "compare",
    "event_schema",
    "export_schemas",
    "lock_text",
    "locked",
    "parse_lock",
    "read_lock",
    "schema_folder",
    "standalone_schema",
    "verify_stored",
    "write_lock",
]

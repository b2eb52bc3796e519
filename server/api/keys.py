"""The public keys a device trusts, published for whoever sets devices up.

``GET /api/v1/keys/server``: the key the server signs check-in answers and audit heads with
(what a device's ``[server] keyring`` holds). ``GET /api/v1/keys/release``: the fleet's release
keyring (the keys bundles must be signed with, and how many must sign), what a device's
``keyring`` holds. Both are public keys, served without credentials: whoever fetches them over
a network an attacker controls must pin them on first use and compare later answers
(``fleet simulate`` does so).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from server import releases
from server.api.common import State
from server.errors import KeyringUnusableError
from signing.keys import public_key_pem

log = logging.getLogger("server")
router = APIRouter(prefix="/api/v1/keys", tags=["keys"])


@router.get("/server")
def server_keys(state: State) -> dict[str, Any]:
    """The server's public signing key(s), PEM, with their key ids."""
    key = state.server_key
    return {"keys": [{"key_id": key.key_id, "public_key": public_key_pem(key.public_key).decode()}]}


@router.get("/release", responses={503: {"description": "the release keyring is not usable"}})
async def release_keyring(state: State) -> dict[str, Any]:
    """The release keys the server accepts bundles from (revoked ones left out), PEM, with
    their key ids, and the number of distinct keys that must sign."""
    try:
        keyring = await run_in_threadpool(releases.load_keyring, state.settings.keyring_dir)
    except KeyringUnusableError as err:
        # served to anyone: the detail (the keyring's path on the server) goes to the log only
        log.warning("GET /api/v1/keys/release: %s", err.detail)
        raise KeyringUnusableError(
            "the server's release keyring is not usable: its operator must trust a release key"
        ) from None
    keys = [
        {"key_id": kid, "public_key": public_key_pem(keyring.trusted[kid]).decode()}
        for kid in keyring.active_key_ids
    ]
    return {"keys": keys, "threshold": keyring.threshold}

"""The console's sign-in limit under concurrency, against uvicorn: parallel wrong tokens from
one address get no more answers than the limit allows (each attempt counts as it starts)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from server.auth import Role, create_operator_token
from server.settings import utc
from server.ui.pages_login import MAX_FAILURES
from tests.server.test_ui_feed import Served, served  # noqa: F401 (the uvicorn fixture)


def test_parallel_wrong_tokens_get_at_most_the_limit_of_answers(served: Served) -> None:  # noqa: F811
    def attempt(n: int) -> int:
        answer = requests.post(
            served.url + "/ui/login",
            data={"token": f"fleet_op_wrong{n}"},
            allow_redirects=False,
            timeout=30,
        )
        return answer.status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(attempt, range(200)))
    assert statuses.count(401) == MAX_FAILURES
    assert statuses.count(429) == 200 - MAX_FAILURES
    # a correct token from the same address is refused until the window ends, and told so
    good = create_operator_token(
        served.db, name="limit", role=Role.VIEWER, created_by="test", now=utc(served.clock)
    )
    refused = requests.post(
        served.url + "/ui/login", data={"token": good}, allow_redirects=False, timeout=10
    )
    assert refused.status_code == 429
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert "a correct token is refused too" in refused.text
    served.clock.advance(61)
    signed = requests.post(
        served.url + "/ui/login", data={"token": good}, allow_redirects=False, timeout=10
    )
    assert signed.status_code == 303

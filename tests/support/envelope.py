"""Assertions on the response envelope, shared by the API tests."""
from __future__ import annotations


def data(response, status: int | None = None):
    """The `data` of a success envelope (any 2xx unless `status` is given)."""
    if status is None:
        assert 200 <= response.status_code < 300, response.text
    else:
        assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert body["status"] == "ok", body
    return body["data"]


def error(response, status: int, code: str | None = None):
    """The `error` of an error envelope with exactly this status (and code, if given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error", body
    assert body["request_id"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]

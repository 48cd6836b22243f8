"""`Client`: a small HTTP client for the server's endpoints (used by the CLI; needs only httpx).

Example::

    c = Client("http://127.0.0.1:8787")
    sid = c.create_session(max_seq_len=8192)["session_id"]
    for text in c.chat_stream([{"role": "user", "content": "hi"}], session_id=sid, max_tokens=32):
        print(text, end="")
"""
from __future__ import annotations

import json
import os

import httpx

URL_ENV = "SUPERLINEAR_LAB_URL"
DEFAULT_URL = "http://127.0.0.1:8787"


class ClientError(Exception):
    """The server answered with an error (`status` and the server's message) or could not be reached."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


class Client:
    """Talks to one server. `api_key` defaults to $SUPERLINEAR_LAB_API_KEY, `url` to $SUPERLINEAR_LAB_URL."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 600.0):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("SUPERLINEAR_LAB_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._model: str | None = None

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, body: dict | None = None, **params) -> dict:
        """One JSON request; raises ClientError with the server's message on an error status."""
        try:
            r = self.http.request(method, path, json=body, params={k: v for k, v in params.items() if v is not None})
        except httpx.HTTPError as e:
            raise ClientError(None, f"cannot reach {self.url}: {e}") from None
        if r.status_code >= 400:
            raise ClientError(r.status_code, _message(r))
        return r.json()

    # ------------------------------------------------------------------ endpoints
    def model(self) -> str:
        """The served model id."""
        if self._model is None:
            self._model = self.request("GET", "/v1/models")["data"][0]["id"]
        return self._model

    def health(self) -> dict:
        return self.request("GET", "/health")

    def create_session(self, session_id: str | None = None, max_seq_len: int | None = None) -> dict:
        return self.request("POST", "/v1/sessions", {"session_id": session_id, "max_seq_len": max_seq_len})

    def sessions(self) -> list[dict]:
        return self.request("GET", "/v1/sessions")["data"]

    def session(self, session_id: str) -> dict:
        return self.request("GET", f"/v1/sessions/{session_id}")

    def delete_session(self, session_id: str) -> dict:
        return self.request("DELETE", f"/v1/sessions/{session_id}")

    def history(self, session_id: str, tail: int | None = None) -> dict:
        return self.request("GET", f"/v1/sessions/{session_id}/history", tail=tail)

    def rollback(self, session_id: str, keep_messages: int) -> dict:
        return self.request("POST", f"/v1/sessions/{session_id}/rollback", {"keep_messages": keep_messages})

    def save(self, session_id: str, title: str = "", description: str = "", tags=()) -> dict:
        return self.request("POST", f"/v1/sessions/{session_id}/save",
                            {"title": title, "description": description, "tags": list(tags)})

    def snapshots(self) -> list[dict]:
        return self.request("GET", "/v1/snapshots")["data"]

    def snapshot(self, snapshot_id: str) -> dict:
        return self.request("GET", f"/v1/snapshots/{snapshot_id}")

    def update_snapshot(self, snapshot_id: str, **fields) -> dict:
        return self.request("PATCH", f"/v1/snapshots/{snapshot_id}",
                            {k: v for k, v in fields.items() if v is not None})

    def delete_snapshot(self, snapshot_id: str) -> dict:
        return self.request("DELETE", f"/v1/snapshots/{snapshot_id}")

    def load_snapshot(self, snapshot_id: str, session_id: str | None = None, force: bool = False) -> dict:
        return self.request("POST", f"/v1/snapshots/{snapshot_id}/load", {"session_id": session_id, "force": force})

    def chat(self, messages: list[dict], session_id: str | None = None, **sampling) -> dict:
        """A non-streaming chat completion (the full response object)."""
        body = {"model": self.model(), "messages": messages, "session_id": session_id, **sampling}
        return self.request("POST", "/v1/chat/completions", body)

    def chat_stream(self, messages: list[dict], session_id: str | None = None, **sampling):
        """Yield the reply's text pieces as the server streams them."""
        body = {"model": self.model(), "messages": messages, "session_id": session_id, "stream": True, **sampling}
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ClientError(r.status_code, _message(r))
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise ClientError(None, event["error"].get("message", str(event["error"])))
                    for choice in event.get("choices", []):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text
        except httpx.HTTPError as e:
            raise ClientError(None, f"cannot reach {self.url}: {e}") from None


def _message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:500] or r.reason_phrase

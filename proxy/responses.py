"""Responses the proxy writes itself: short plain-text errors and the status line table."""

from __future__ import annotations

from http import HTTPStatus

REASONS = {status.value: status.phrase for status in HTTPStatus}


def reason_phrase(status: int) -> str:
    return REASONS.get(status, "Unknown")


def plain_response(status: int, body: str, *, close: bool, extra_headers: tuple = (),
                   head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response with a text/plain body (``head_only`` for HEAD requests)."""
    payload = (body.rstrip("\n") + "\n").encode("utf-8")
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}",
             "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(payload)}"]
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + payload


OVERLOADED = plain_response(503, "503 Service Unavailable: the proxy is overloaded, try again later", close=True)


def write_overloaded(sock) -> None:
    """core.SocketServer's overload callback: one non-blocking send, then the server closes."""
    sock.send(OVERLOADED)

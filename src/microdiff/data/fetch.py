"""HTTP(S) fetches for the downloader: one body per URL, within a size cap and a deadline, with retries.

``fetch(url, FetchSettings(timeout=10, retries=2, max_bytes=20 MiB))`` returns the body and the number
of attempts, or raises :class:`DownloadError` with a reason the report counts ("timeout", "http 404",
"too large", "opted out", ...). Only transient failures are retried (timeouts, 5xx, 408/429,
connection resets), after ``backoff * 2**i`` seconds.

**The timeout caps a whole attempt**: name resolution, connect, TLS handshake, proxy tunnel, status
line, headers, every redirect hop and the body, whatever the server does. A socket timeout alone
bounds only each single read, so a server that sends one byte every second could hold an attempt
forever; here an :class:`AttemptDeadline` shuts every socket of the attempt down when its time is up,
which wakes the blocked read at once (``shutdown`` from another thread is the portable way to
interrupt a read; the socket is closed by its owner as usual).

Only ``http`` and ``https`` are fetched, also after a redirect (no ``file:``, ``ftp:``, ``data:``
handlers), and urllib's cap on redirect chains holds (10 hops, 4 repeats of one URL).
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import math
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..utils.errors import UserError

USER_AGENT = "microdiff-download/0.1 (image-text dataset downloader)"
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")  # as img2dataset honours them
MAX_BACKOFF_S = 30.0
CHUNK = 1 << 16
# failures a deadline's shutdown can cause (a cut read looks like a reset or a bad response): when the
# deadline has passed they are reported as what they are, a timeout
_CUT_SHORT = ("connection error", "bad response", "network error", "ssl error", "timeout")


@dataclass(frozen=True)
class FetchSettings:
    timeout: float = 10.0  # seconds: the cap on one whole attempt (connect + headers + body)
    retries: int = 2  # extra attempts after a transient failure
    backoff: float = 0.5  # seconds before the first retry, doubled for each further one
    max_bytes: int = 20 * 2**20
    user_agent: str = USER_AGENT
    opt_out_directives: tuple[str, ...] = OPT_OUT_DIRECTIVES

    def __post_init__(self):
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise UserError(f"timeout (--timeout): must be a number of seconds > 0, got {self.timeout}")
        if not (isinstance(self.retries, int) and self.retries >= 0):
            raise UserError(f"retries (--retries): must be a whole number >= 0, got {self.retries}")
        if not (isinstance(self.backoff, (int, float)) and math.isfinite(self.backoff) and self.backoff >= 0):
            raise UserError(f"backoff: must be a number of seconds >= 0, got {self.backoff}")
        if not (isinstance(self.max_bytes, int) and self.max_bytes > 0):
            raise UserError(f"max_bytes (--max-mb): must be > 0, got {self.max_bytes}")


class DownloadError(Exception):
    """One failed sample: ``reason`` is the category counted in the report, ``detail`` the message."""

    def __init__(self, reason: str, detail: str = "", transient: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.transient = reason, detail, transient


def fetch(url: str, settings: FetchSettings = FetchSettings()) -> tuple[bytes, int]:
    """The body of ``url`` and the number of attempts it took; raises DownloadError.

    Transient failures are retried ``settings.retries`` times, sleeping ``backoff * 2**i`` between;
    each attempt ends within ``settings.timeout`` seconds."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):  # file:// etc. would let a shared manifest read local files
        raise DownloadError("bad url", f"unsupported scheme {scheme!r} (http and https only)")
    attempts = 0
    while True:
        attempts += 1
        try:
            return _fetch_once(url, settings), attempts
        except DownloadError as e:
            if not e.transient or attempts > settings.retries:
                e.attempts = attempts
                raise
        time.sleep(min(settings.backoff * 2 ** (attempts - 1), MAX_BACKOFF_S))


# ----------------------------------------------------------------------------- the deadline of one attempt
class AttemptDeadline:
    """A deadline ``seconds`` from ``__enter__`` for everything one attempt does on the network.

    Sockets are opened through :meth:`open_socket` (name resolution in a helper thread, so a stuck
    resolver cannot outlast the deadline either; each connect with the time left as its timeout) and
    watched: at the deadline a timer shuts them all down, so any read blocked on them returns at once.
    ``expired`` then says why the attempt failed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._end = 0.0
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []  # duplicates: shut down at the deadline, closed at exit
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> AttemptDeadline:
        self._end = time.monotonic() + self.seconds
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._watched:
                sock.close()
            self._watched.clear()

    def left(self) -> float:
        """Seconds left; raises TimeoutError once there are none."""
        left = self._end - time.monotonic()
        if left <= 0 or self.expired:
            raise TimeoutError(f"attempt not complete after {self.seconds:g} s")
        return left

    def open_socket(self, address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        """``socket.create_connection`` under the deadline (http.client calls it to connect)."""
        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in self._resolve(host, port):
            sock = socket.socket(family, kind, proto)
            try:
                self._watch(sock)
                sock.settimeout(self.left())  # each read: at most what the attempt has left
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                error = e
                sock.close()
        raise error or OSError(f"no address for {host}")

    def _resolve(self, host: str, port: int) -> list:
        try:
            ipaddress.ip_address(host.strip("[]"))
            return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)  # a literal: nothing to look up
        except ValueError:
            pass
        found: dict[str, Any] = {}

        def resolve() -> None:
            try:
                found["infos"] = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            except OSError as e:
                found["error"] = e

        thread = threading.Thread(target=resolve, name="microdiff-resolve", daemon=True)
        thread.start()
        thread.join(self.left())
        if thread.is_alive():  # left to finish on its own; the attempt is over
            raise TimeoutError(f"no address for {host} within {self.seconds:g} s")
        if "error" in found:
            raise found["error"]
        return found["infos"]

    def _watch(self, sock: socket.socket) -> None:
        # a duplicate: it stays valid when TLS wraps (detaches) the original or its owner closes it,
        # and shutting it down ends the connection both share
        duplicate = sock.dup()
        with self._lock:
            self._watched.append(duplicate)
            if self.expired:
                _shutdown(duplicate)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._watched:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected yet, or already gone
        pass


class _Deadlined:
    """An http.client connection whose sockets come from an AttemptDeadline."""

    def __init__(self, *args, deadline: AttemptDeadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = deadline.open_socket  # http.client's own hook for making the socket


class _HTTPConnection(_Deadlined, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Deadlined, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: AttemptDeadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, deadline=self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: AttemptDeadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self.deadline), req,
                            context=_tls_context())


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """The default verifying context, made once (loading the CA store per connection is slow)."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


@functools.lru_cache(maxsize=1)
def _proxies() -> dict[str, str]:
    """The proxy settings (environment, or the system's), read once rather than per attempt."""
    return urllib.request.getproxies()


def _opener(deadline: AttemptDeadline) -> urllib.request.OpenerDirector:
    """urllib's opener without the file:, ftp: and data: handlers (a redirect cannot reach them), whose
    connections, redirect hops and proxy tunnels included, all live under ``deadline``."""
    r = urllib.request
    opener = r.OpenerDirector()
    for handler in (r.ProxyHandler(_proxies()), r.UnknownHandler(), _HTTPHandler(deadline), _HTTPSHandler(deadline),
                    r.HTTPDefaultErrorHandler(), r.HTTPRedirectHandler(), r.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


# ----------------------------------------------------------------------------- one attempt
def _fetch_once(url: str, settings: FetchSettings) -> bytes:
    with AttemptDeadline(settings.timeout) as deadline:
        try:
            body = _get(url, settings, deadline)
        except DownloadError as e:
            if deadline.expired and e.reason in _CUT_SHORT:
                raise _timeout(settings.timeout) from None
            raise
    if deadline.expired:  # a read cut at the deadline looks like the end of the body: it is not
        raise _timeout(settings.timeout)
    return body


def _timeout(seconds: float) -> DownloadError:
    return DownloadError("timeout", f"attempt not complete after {seconds:g} s", transient=True)


def _get(url: str, settings: FetchSettings, deadline: AttemptDeadline) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": settings.user_agent,
                                                   "Accept": "image/*,*/*;q=0.8"})
    try:
        with _opener(deadline).open(request, timeout=settings.timeout) as response:
            _check_opt_out(response.headers.get_all("X-Robots-Tag") or [], settings.opt_out_directives)
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.strip().isdigit() else None
            if length is not None and length > settings.max_bytes:
                raise DownloadError("too large", f"Content-Length {length} > max {settings.max_bytes} bytes")
            chunks, total = [], 0
            while chunk := response.read1(CHUNK):  # read1: what one recv got
                total += len(chunk)
                if total > settings.max_bytes:
                    raise DownloadError("too large", f"body over max {settings.max_bytes} bytes")
                chunks.append(chunk)
            if length is not None and total < length:  # http.client's read1 does not notice
                raise DownloadError("connection error", f"body ended after {total} of {length} bytes", transient=True)
            return b"".join(chunks)
    except DownloadError:
        raise
    except urllib.error.HTTPError as e:
        e.close()
        transient = e.code in (408, 429) or e.code >= 500
        raise DownloadError(f"http {e.code}", str(e.reason), transient=transient) from None
    except urllib.error.URLError as e:
        raise _network_error(e.reason) from None
    except http.client.IncompleteRead as e:
        raise DownloadError("connection error", f"incomplete read ({len(e.partial)} bytes)", transient=True) from None
    except http.client.HTTPException as e:
        raise DownloadError("bad response", f"{type(e).__name__}: {e}") from None
    except ValueError as e:  # malformed URL
        raise DownloadError("bad url", str(e)) from None
    except OSError as e:
        raise _network_error(e) from None


def _network_error(reason: Any) -> DownloadError:
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return DownloadError("timeout", str(reason) or "timed out", transient=True)
    if isinstance(reason, socket.gaierror):
        return DownloadError("dns error", str(reason))
    if isinstance(reason, ssl.SSLError):
        return DownloadError("ssl error", str(reason))
    if isinstance(reason, ConnectionError):
        return DownloadError("connection error", f"{type(reason).__name__}: {reason}", transient=True)
    if isinstance(reason, str) and "timed out" in reason:
        return DownloadError("timeout", reason, transient=True)
    return DownloadError("network error", f"{type(reason).__name__}: {reason}")


def _check_opt_out(values: list[str], directives: Sequence[str]) -> None:
    """X-Robots-Tag values like "noai, noimageai" or "somebot: noindex" (honoured for every bot)."""
    for value in values:
        for part in value.lower().split(","):
            token = part.rsplit(":", 1)[-1].strip()
            if token in directives:
                raise DownloadError("opted out", f"X-Robots-Tag: {value}")


__all__ = ["fetch", "FetchSettings", "DownloadError", "AttemptDeadline", "USER_AGENT", "OPT_OUT_DIRECTIVES"]

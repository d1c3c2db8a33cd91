"""Load a page in headless Chromium and report what a user's browser would: errors, requests, the text shown.

Driven through the DevTools protocol (``--remote-debugging-port``) with the small websocket
client below (stdlib only: neither websocket package is in the dev extra, and the protocol
needs four verbs). What counts as a failure, and why it is the real thing:

- ``Runtime.exceptionThrown``: a script threw;
- ``Runtime.consoleAPICalled`` (error, assert) and ``Log.entryAdded`` (error): console errors,
  Content-Security-Policy violations included (a fetch our CSP blocks lands here);
- ``Network.requestWillBeSent`` for anything but the page itself: a network request, made.

tests/unit/reports/test_html_reports.py proves each detector on a page built to trip it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--mute-audio", "--hide-scrollbars"]
INSTALL_HINT = ("Chromium not found: `make test` installs Debian's chromium when it runs as root with apt-get "
                "(apt-get install chromium); elsewhere install it and put `chromium` on PATH")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class WebSocket:
    """The client side of RFC 6455, text frames only: enough for the DevTools protocol."""

    def __init__(self, url: str, timeout: float = 30.0):
        assert url.startswith("ws://"), url
        host_port, _, path = url[len("ws://"):].partition("/")
        host, _, port = host_port.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        # No Origin header: Chromium refuses DevTools websockets from web origins, not from tools.
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def send(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x81, 0x80 | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            opcode, size = first & 0x0F, second & 0x7F
            if size == 126:
                size = struct.unpack("!H", self._read(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(size)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode == 0x9:  # ping: answer, keep reading
                continue
            message += payload
            if first & 0x80:
                return message.decode()

    def close(self) -> None:
        self.sock.close()


@dataclass
class PageLoad:
    """What loading one page did."""

    url: str
    text: str = ""  # document.body.innerText
    exceptions: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL requested besides the page itself
    banner_style: str = ""  # "text colour|background" of the verdict banner: both must differ to be read

    def problems(self) -> list[str]:
        return ([f"exception: {e}" for e in self.exceptions] + [f"console error: {e}" for e in self.console_errors]
                + [f"network request: {r}" for r in self.requests])


class Browser:
    """One headless Chromium for a test session; :meth:`load` opens a page and waits for it to settle."""

    def __init__(self, executable: str):
        self.profile = Path(tempfile.mkdtemp(prefix="d2merge-chromium-"))
        self.process = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                         "--remote-debugging-port=0", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("headless Chromium did not start (no DevToolsActivePort)")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])
        self._next_id = 0

    def _page_socket(self) -> WebSocket:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as answer:
            target = json.load(answer)
        return WebSocket(target["webSocketDebuggerUrl"])

    def _call(self, ws: WebSocket, method: str, params: dict[str, Any] | None, events: list[dict[str, Any]]
              ) -> dict[str, Any]:
        self._next_id += 1
        ws.send(json.dumps({"id": self._next_id, "method": method, "params": params or {}}))
        while True:
            message = json.loads(ws.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            events.append(message)

    def load(self, path: str | Path, settle_s: float = 0.5, timeout_s: float = 60.0) -> PageLoad:
        url = Path(path).absolute().as_uri()
        result = PageLoad(url)
        ws = self._page_socket()
        events: list[dict[str, Any]] = []
        try:
            for domain in ("Runtime", "Log", "Network", "Page"):
                self._call(ws, f"{domain}.enable", None, events)
            self._call(ws, "Page.navigate", {"url": url}, events)
            deadline = time.monotonic() + timeout_s
            loaded_at = None
            ws.sock.settimeout(0.1)
            while time.monotonic() < deadline:
                if loaded_at is None and any(e.get("method") == "Page.loadEventFired" for e in events):
                    loaded_at = time.monotonic()
                if loaded_at is not None and time.monotonic() - loaded_at > settle_s:
                    break
                try:
                    events.append(json.loads(ws.recv()))
                except (socket.timeout, TimeoutError):
                    continue
            else:
                raise TimeoutError(f"{url} did not finish loading in {timeout_s:.0f} s")
            ws.sock.settimeout(30)
            text = self._call(ws, "Runtime.evaluate", {"expression": "document.body ? document.body.innerText : ''",
                                                       "returnByValue": True}, events)
            result.text = str(text.get("result", {}).get("value", ""))
            style = self._call(ws, "Runtime.evaluate", {"expression": (
                "(() => { const b = document.querySelector('[role=status]'); if (!b) return '';"
                " const s = getComputedStyle(b); return s.color + '|' + s.backgroundColor; })()"),
                "returnByValue": True}, events)
            result.banner_style = str(style.get("result", {}).get("value", ""))
        finally:
            ws.close()
        for event in events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                result.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                result.console_errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                                      for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                result.console_errors.append(params["entry"].get("text", ""))
            elif method == "Network.requestWillBeSent":
                requested = params.get("request", {}).get("url", "")
                if requested != url:
                    result.requests.append(requested)
        return result

    def screenshot(self, path: str | Path, out: str | Path, width: int = 1100, height: int = 1400,
                   from_heading: str | None = None) -> None:
        """A PNG of the page (what docs/ shows): its top, or ``height`` pixels from the heading that starts so."""
        ws = self._page_socket()
        events: list[dict[str, Any]] = []
        try:
            self._call(ws, "Emulation.setDeviceMetricsOverride",
                       {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, events)
            self._call(ws, "Page.enable", None, events)
            self._call(ws, "Page.navigate", {"url": Path(path).absolute().as_uri()}, events)
            while not any(e.get("method") == "Page.loadEventFired" for e in events):
                events.append(json.loads(ws.recv()))
            params: dict[str, Any] = {"format": "png"}
            if from_heading is not None:
                find = ("[...document.querySelectorAll('h2,h3')].find(h => h.textContent.startsWith("
                        f"{json.dumps(from_heading)})).getBoundingClientRect().top + window.scrollY")
                top = self._call(ws, "Runtime.evaluate", {"expression": find, "returnByValue": True}, events)
                params.update(captureBeyondViewport=True, clip={"x": 0, "y": top["result"]["value"] - 8,
                                                                "width": width, "height": height, "scale": 1})
            shot = self._call(ws, "Page.captureScreenshot", params, events)
            Path(out).write_bytes(base64.b64decode(shot["data"]))
        finally:
            ws.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
